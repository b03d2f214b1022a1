// A small, strict command-line parser: `--name value`, `--name=value` and boolean `--flag`. Unknown options and
// missing values are usage errors with a sentence that says what to do.

export class UsageError extends Error {
  override readonly name = 'UsageError';
}

export interface OptionSpec {
  /** 'string' takes a value; 'boolean' is a flag. */
  type: 'string' | 'boolean';
  required?: boolean;
  /** A string option that may be given several times; its values are collected in order (listOption). */
  repeatable?: boolean;
  description: string;
}

export type ParsedOptions = Record<string, string | string[] | boolean | undefined>;

export function parseOptions(verb: string, argv: string[], spec: Record<string, OptionSpec>): ParsedOptions {
  const out: ParsedOptions = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) throw new UsageError(`unexpected argument '${arg}' for '${verb}' (options start with --)`);
    const eq = arg.indexOf('=');
    const name = eq >= 0 ? arg.slice(2, eq) : arg.slice(2);
    const option = spec[name];
    if (!option) {
      const known = Object.keys(spec).map((k) => `--${k}`).join(', ');
      throw new UsageError(`unknown option --${name} for '${verb}' (known: ${known})`);
    }
    if (option.type === 'boolean') {
      if (eq >= 0) throw new UsageError(`--${name} is a flag and takes no value`);
      out[name] = true;
      continue;
    }
    const value = eq >= 0 ? arg.slice(eq + 1) : argv[++i];
    if (value === undefined || (eq < 0 && value.startsWith('--')))
      throw new UsageError(`--${name} needs a value${value === undefined ? '' : ` (a value that starts with -- is written --${name}=${value})`}`);
    if (option.repeatable) out[name] = [...((out[name] as string[] | undefined) ?? []), value];
    else out[name] = value;
  }
  for (const [name, option] of Object.entries(spec)) {
    if (option.required && out[name] === undefined) throw new UsageError(`'${verb}' needs --${name} (${option.description})`);
  }
  return out;
}

export function stringOption(options: ParsedOptions, name: string): string | undefined {
  const v = options[name];
  return typeof v === 'string' ? v : undefined;
}

/** A number option's value; a usage error naming the option when it is not a number. */
export function numberOption(options: ParsedOptions, name: string): number | undefined {
  const v = stringOption(options, name);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n)) throw new UsageError(`--${name} must be a number, got '${v}'`);
  return n;
}

/** The values of a repeatable option, in the order given (empty when absent). */
export function listOption(options: ParsedOptions, name: string): string[] {
  const v = options[name];
  return Array.isArray(v) ? v : typeof v === 'string' ? [v] : [];
}

export function requiredString(options: ParsedOptions, name: string): string {
  const v = stringOption(options, name);
  if (v === undefined) throw new UsageError(`--${name} is required`);
  return v;
}

export function integerOption(options: ParsedOptions, name: string, fallback: number): number {
  const v = stringOption(options, name);
  if (v === undefined) return fallback;
  if (!/^-?\d+$/.test(v)) throw new UsageError(`--${name} must be an integer, got '${v}'`);
  return Number(v);
}

/** Parses "1,2,3" into token ids; every entry must be a non-negative integer. */
export function parseIdList(text: string, option: string): Int32Array {
  const parts = text.split(',').map((s) => s.trim());
  const ids = new Int32Array(parts.length);
  parts.forEach((p, i) => {
    if (!/^\d+$/.test(p)) throw new UsageError(`--${option} entry ${i + 1} ('${p}') is not a token id (a non-negative integer)`);
    const n = Number(p);
    if (n > 0x7fffffff) throw new UsageError(`--${option} entry ${i + 1} (${p}) is too large for a token id`);
    ids[i] = n;
  });
  return ids;
}

export function helpText(verb: string, summary: string, spec: Record<string, OptionSpec>): string {
  const lines = [`qlora-studio ${verb}: ${summary}`, ''];
  for (const [name, o] of Object.entries(spec)) {
    lines.push(`  --${name}${o.type === 'string' ? ' VALUE' : ''}${o.required ? '' : ' (optional)'}\n      ${o.description}`);
  }
  return lines.join('\n');
}
