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
