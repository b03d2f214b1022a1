// GPU telemetry while a run trains on the GPU: about once a second, the GPU's memory (total, used, free),
// utilization, temperature and power from NVML become a `gpu` event, and the latest sample is the device figure of
// each memory event, so the panel draws the engine's bytes by category inside what the device holds in all. Sampled
// between steps (the engine's calls are synchronous), so a step longer than a second gives one sample per step.
import type { NativeGpuInfo } from '../engine/native';
import type { GpuEvent } from '../protocol/events';

export type GpuSource = () => NativeGpuInfo[] | null;

export class GpuMonitor {
  private lastAt = -Infinity;
  private last: NativeGpuInfo | null = null;

  /** `index`: the NVML index of the GPU trained on. */
  constructor(
    private readonly index: number,
    private readonly source: GpuSource,
    private readonly intervalMs = 1000,
  ) {}

  /** A `gpu` event when at least intervalMs passed since the previous one and the GPU answered; else null. */
  poll(nowMs: number): Omit<GpuEvent, 'time'> | null {
    if (nowMs - this.lastAt < this.intervalMs) return null;
    this.lastAt = nowMs;
    const gpu = this.source()?.find((g) => g.index === this.index) ?? null;
    if (!gpu) return null;
    this.last = gpu;
    const { index, name, memoryTotal, memoryUsed, memoryFree, utilization, temperature, powerW } = gpu;
    return { kind: 'gpu', index, name, memoryTotal, memoryUsed, memoryFree, utilization, temperature, powerW };
  }

  /** The memory event's `device`: the latest sample's total and used bytes. */
  device(): { total: number; used: number } | null {
    return this.last ? { total: this.last.memoryTotal, used: this.last.memoryUsed } : null;
  }
}
