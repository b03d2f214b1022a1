// Typed arrays reused from tensor to tensor while a GGUF is written, each grown to the largest size asked of it: a
// fresh array for every tensor is zeroed and faulted in again, which took a fifth of a 1B model's q4_k_m export.

/** One reused array. A view it returns holds good until the next view of the same array. */
export class ReusedArray<A extends Float32Array | Uint8Array> {
  private array: A;

  constructor(private readonly make: (length: number) => A) {
    this.array = make(0);
  }

  /** The first `length` elements (contents left from earlier use). */
  view(length: number): A {
    if (this.array.length < length) {
      this.array = this.make(0); // the smaller one is garbage before the larger one is made
      this.array = this.make(length);
    }
    return this.array.subarray(0, length) as A;
  }
}

/**
 * The first `length` values of `into` where it is given (a view of them; an array shorter than that is an error naming
 * `what`), else a new array: where a reader or transform writes its result.
 */
export function floatsInto(into: Float32Array | undefined, length: number, what: string): Float32Array {
  if (into === undefined) return new Float32Array(length);
  if (into.length < length) throw new Error(`${what}: ${into.length} values of room for ${length}`);
  return into.subarray(0, length);
}

/** The arrays a tensor goes through: its values as read, laid out in GGUF order (where that moves rows), encoded. */
export class TensorScratch {
  readonly read = new ReusedArray((n) => new Float32Array(n));
  readonly laidOut = new ReusedArray((n) => new Float32Array(n));
  readonly encoded = new ReusedArray((n) => new Uint8Array(n));
}
