// Learning-rate schedules with transformers' semantics: the multiplier for optimizer step s (1-based) is
// lambda(s - 1), so with warmup the first step runs at lr 0, exactly as get_*_schedule_with_warmup does.

export type ScheduleKind = 'constant' | 'linear' | 'cosine';

export interface Schedule {
  kind: ScheduleKind;
  lr: number;
  warmupSteps: number;
  totalSteps: number;
}

export function learningRate(s: Schedule, step: number): number {
  const current = step - 1;
  if (current < s.warmupSteps) return (s.lr * current) / Math.max(1, s.warmupSteps);
  switch (s.kind) {
    case 'constant':
      return s.lr;
    case 'linear':
      return s.lr * Math.max(0, (s.totalSteps - current) / Math.max(1, s.totalSteps - s.warmupSteps));
    case 'cosine': {
      const progress = (current - s.warmupSteps) / Math.max(1, s.totalSteps - s.warmupSteps);
      return s.lr * Math.max(0, 0.5 * (1 + Math.cos(Math.PI * progress)));
    }
  }
}

/**
 * What a warmup as long as the run or longer does (the learning rate never reaches its peak; a run of one step
 * trains at lr 0 and its adapter stays the base model), or null when the warmup is shorter than the run.
 */
export function warmupWarning(s: Schedule): string | null {
  if (s.warmupSteps === 0 || s.warmupSteps < s.totalSteps) return null;
  const run = `the warmup (warmupSteps ${s.warmupSteps}) is not shorter than the run (${s.totalSteps} step${s.totalSteps === 1 ? '' : 's'})`;
  const last = learningRate(s, s.totalSteps);
  if (last === 0) return `${run}: every step trains at learning rate 0, so the adapter will not change; lower warmupSteps or train more steps`;
  return `${run}: the learning rate rises to ${last.toExponential(2)} at the last step and never reaches its peak ${s.lr}; lower warmupSteps or train more steps`;
}
