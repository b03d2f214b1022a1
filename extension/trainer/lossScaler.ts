// Dynamic loss scaling for fp16 compute, as torch.cuda.amp.GradScaler does it: the loss (so every gradient) is
// multiplied by a scale that keeps small gradients above fp16's smallest values; when the gradients overflow, the
// step is skipped and the scale halved; after `growthInterval` good steps in a row it doubles. The state is part of
// a checkpoint, so a resumed run scales as the uninterrupted one would have.

export interface LossScalerState {
  scale: number;
  /** Good steps since the scale last changed. */
  goodSteps: number;
}

export interface LossScalerOptions {
  initialScale: number;
  growthFactor: number;
  backoffFactor: number;
  growthInterval: number;
  /** The scale never goes below this (an overflow at it is a real divergence). */
  minScale: number;
}

/** GradScaler's defaults. */
export const DEFAULT_LOSS_SCALER: LossScalerOptions = { initialScale: 65536, growthFactor: 2, backoffFactor: 0.5, growthInterval: 2000, minScale: 1 };

export class LossScaler {
  private state: LossScalerState;

  constructor(
    private readonly options: LossScalerOptions = DEFAULT_LOSS_SCALER,
    state?: LossScalerState,
  ) {
    this.state = state ? { ...state } : { scale: options.initialScale, goodSteps: 0 };
  }

  get scale(): number {
    return this.state.scale;
  }

  /** Whether an overflow at the current scale may still be skipped (above the minimum) or is a divergence. */
  get canBackOff(): boolean {
    return this.state.scale > this.options.minScale;
  }

  /** After a step: `overflowed` when its gradients were not finite (the update was skipped). */
  update(overflowed: boolean): void {
    if (overflowed) {
      this.state = { scale: Math.max(this.options.minScale, this.state.scale * this.options.backoffFactor), goodSteps: 0 };
      return;
    }
    const goodSteps = this.state.goodSteps + 1;
    this.state = goodSteps >= this.options.growthInterval ? { scale: this.state.scale * this.options.growthFactor, goodSteps: 0 } : { scale: this.state.scale, goodSteps };
  }

  snapshot(): LossScalerState {
    return { ...this.state };
  }
}
