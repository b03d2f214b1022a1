// A command as one line to paste into a terminal: on POSIX shells arguments with spaces, quotes or other special
// characters single-quoted; on Windows (PowerShell or cmd, neither of which reads '...' as POSIX does) in double
// quotes, backslashes left as they are. For messages only; commands are always run with argument arrays.

export function shellLine(args: readonly string[], platform: NodeJS.Platform = process.platform): string {
  if (platform === 'win32') return args.map((a) => (/^[\w.\\/:@=+-]+$/.test(a) ? a : `"${a.replace(/"/g, '\\"')}"`)).join(' ');
  return args.map((a) => (/^[\w./:@=+-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}
