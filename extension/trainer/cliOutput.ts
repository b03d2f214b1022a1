// What the command-line verbs write: results on stdout, a line each; warnings on stderr, "warning: " first.

export function print(text: string): void {
  process.stdout.write(text + '\n');
}

export function printWarnings(warnings: readonly string[]): void {
  for (const w of warnings) process.stderr.write(`warning: ${w}\n`);
}
