// A command as one line to paste into a POSIX shell: arguments with spaces, quotes or other special characters
// single-quoted. For messages only; commands are always run with argument arrays.

export function shellLine(args: readonly string[]): string {
  return args.map((a) => (/^[\w./:@=+-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}
