// A small evaluator for the part of Go's text/template that the Ollama templates written by export-ollama use, so
// that every emitted template is rendered here and compared with the model's own (Jinja) chat template before it is
// written. Supported: text with {{- / -}} trimming, {{/* comments */}}, {{ pipeline }} output, {{ if }} / {{ else if }}
// / {{ else }} / {{ end }}, {{ range [$i, $v :=] pipeline }} with {{ else }}, variables ($, $x := ..., $x = ...),
// fields (.A.B, $.A, $x.A), string/number/bool literals, parentheses, and the builtins and, or, not, eq, ne, len,
// slice and index. Anything else (pipes `|`, other functions, with/define/template/block) is a parse error rather
// than a guess, so an emitted template that strays outside this subset fails loudly.

export type GoValue = string | number | boolean | null | undefined | GoValue[] | { [key: string]: GoValue };

type Operand =
  | { kind: 'literal'; value: GoValue }
  | { kind: 'dot'; fields: string[] }
  | { kind: 'var'; name: string; fields: string[] }
  | { kind: 'call'; fn: string; args: Operand[] }
  | { kind: 'paren'; pipe: Pipeline; fields: string[] };

interface Pipeline {
  /** `$a :=` / `$a, $b :=` (declare) or `$a =` (assign). */
  vars: string[];
  assign: 'declare' | 'assign' | null;
  command: Operand;
}

type Node =
  | { kind: 'text'; text: string }
  | { kind: 'action'; pipe: Pipeline }
  | { kind: 'if'; branches: { cond: Pipeline; body: Node[] }[]; otherwise: Node[] | null }
  | { kind: 'range'; pipe: Pipeline; body: Node[]; otherwise: Node[] | null };

const BUILTINS = new Set(['and', 'or', 'not', 'eq', 'ne', 'len', 'slice', 'index']);
const KEYWORDS = new Set(['if', 'else', 'end', 'range', 'with', 'define', 'template', 'block', 'break', 'continue', 'nil']);

export class GoTemplateError extends Error {
  override name = 'GoTemplateError';
}

/** The raw actions and text of a template, with {{- and -}} trimming applied to the text around them. */
function lex(source: string): ({ kind: 'text'; text: string } | { kind: 'action'; body: string; at: number })[] {
  const out: ({ kind: 'text'; text: string } | { kind: 'action'; body: string; at: number })[] = [];
  let pos = 0;
  let trimNext = false;
  while (pos <= source.length) {
    const open = source.indexOf('{{', pos);
    let text = source.slice(pos, open < 0 ? source.length : open);
    if (trimNext) text = text.replace(/^[ \t\r\n]+/, '');
    if (open < 0) {
      if (text !== '') out.push({ kind: 'text', text });
      break;
    }
    let start = open + 2;
    // "{{- " trims the text before; a dash must be followed by a space (else it is a negative number)
    if (/^- /.test(source.slice(start, start + 2)) || /^-[\t\r\n]/.test(source.slice(start, start + 2))) {
      text = text.replace(/[ \t\r\n]+$/, '');
      start += 1;
    }
    if (text !== '') out.push({ kind: 'text', text });
    const close = findClose(source, start);
    if (close < 0) throw new GoTemplateError(`unclosed action at offset ${open}`);
    let end = close;
    trimNext = false;
    if (/[ \t\r\n]-$/.test(source.slice(start, close))) {
      end = close - 1;
      trimNext = true;
    }
    const body = source.slice(start, end).trim();
    if (!(body.startsWith('/*') && body.endsWith('*/'))) out.push({ kind: 'action', body, at: open });
    pos = close + 2;
  }
  return out;
}

/** The offset of the `}}` closing an action that starts at `from`, skipping string literals. */
function findClose(source: string, from: number): number {
  for (let i = from; i < source.length; i++) {
    const c = source[i];
    if (c === '"') {
      for (i++; i < source.length && source[i] !== '"'; i++) if (source[i] === '\\') i++;
    } else if (c === '`') {
      i = source.indexOf('`', i + 1);
      if (i < 0) return -1;
    } else if (c === '}' && source[i + 1] === '}') return i;
  }
  return -1;
}

type Token =
  | { t: 'str'; v: string }
  | { t: 'num'; v: number }
  | { t: 'ident'; v: string }
  | { t: 'field'; v: string[] }
  | { t: 'var'; v: string; fields: string[] }
  | { t: 'punct'; v: '(' | ')' | ',' | ':=' | '=' | '|' };

function tokenize(body: string, where: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  const fieldChain = (): string[] => {
    const fields: string[] = [];
    while (body[i] === '.' && /[A-Za-z_]/.test(body[i + 1] ?? '')) {
      const m = /^\.([A-Za-z_][A-Za-z0-9_]*)/.exec(body.slice(i))!;
      fields.push(m[1]);
      i += m[0].length;
    }
    return fields;
  };
  while (i < body.length) {
    const c = body[i];
    const rest = body.slice(i);
    if (/\s/.test(c)) {
      i++;
    } else if (c === '"') {
      const m = /^"(?:[^"\\]|\\.)*"/.exec(rest);
      if (!m) throw new GoTemplateError(`${where}: unterminated string`);
      tokens.push({ t: 'str', v: unquoteGo(m[0], where) });
      i += m[0].length;
    } else if (c === '`') {
      const end = body.indexOf('`', i + 1);
      tokens.push({ t: 'str', v: body.slice(i + 1, end) });
      i = end + 1;
    } else if (rest.startsWith(':=')) {
      tokens.push({ t: 'punct', v: ':=' });
      i += 2;
    } else if (c === '(' || c === ')' || c === ',' || c === '=' || c === '|') {
      tokens.push({ t: 'punct', v: c });
      i++;
    } else if (c === '$') {
      const m = /^\$([A-Za-z_][A-Za-z0-9_]*)?/.exec(rest)!;
      i += m[0].length;
      tokens.push({ t: 'var', v: m[1] ?? '', fields: fieldChain() });
    } else if (c === '.') {
      const fields = fieldChain();
      if (fields.length === 0) i++; // plain dot
      tokens.push({ t: 'field', v: fields });
    } else if (/[-0-9]/.test(c)) {
      const m = /^-?[0-9]+/.exec(rest);
      if (!m) throw new GoTemplateError(`${where}: unexpected "${c}"`);
      tokens.push({ t: 'num', v: Number(m[0]) });
      i += m[0].length;
    } else if (/[A-Za-z_]/.test(c)) {
      const m = /^[A-Za-z_][A-Za-z0-9_]*/.exec(rest)!;
      tokens.push({ t: 'ident', v: m[0] });
      i += m[0].length;
    } else {
      throw new GoTemplateError(`${where}: unexpected "${c}"`);
    }
  }
  return tokens;
}

/** A Go interpreted string literal ("..." with \n, \t, \", \\, \xHH, \uHHHH, \UHHHHHHHH escapes). */
function unquoteGo(literal: string, where: string): string {
  return literal.slice(1, -1).replace(/\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[abfnrtv\\"'])/g, (_, e: string) => {
    const simple: Record<string, string> = { a: '\x07', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t', v: '\v', '\\': '\\', '"': '"', "'": "'" };
    if (e.length === 1) return simple[e];
    const code = parseInt(e.slice(1), 16);
    if (e[0] === 'x' && code > 0x7f) throw new GoTemplateError(`${where}: \\x escapes above 0x7f are bytes, not supported`);
    return String.fromCodePoint(code);
  });
}

class Parser {
  private tokens: Token[] = [];
  private pos = 0;
  constructor(private readonly where: string) {}

  pipeline(body: string): Pipeline {
    this.tokens = tokenize(body, this.where);
    this.pos = 0;
    let vars: string[] = [];
    let assign: Pipeline['assign'] = null;
    // a declaration: $a := ..., $a, $b := ..., or an assignment $a = ...
    const decl = this.scanDeclaration();
    if (decl) {
      vars = decl.vars;
      assign = decl.assign;
    }
    const command = this.command();
    if (this.pos < this.tokens.length) {
      const t = this.tokens[this.pos];
      throw new GoTemplateError(`${this.where}: unexpected ${t.t === 'punct' && t.v === '|' ? 'pipe "|" (not supported)' : JSON.stringify('v' in t ? t.v : t)}`);
    }
    return { vars, assign, command };
  }

  private scanDeclaration(): { vars: string[]; assign: 'declare' | 'assign' } | null {
    const t = this.tokens;
    const isVar = (k: number) => t[k]?.t === 'var' && (t[k] as { fields: string[] }).fields.length === 0 && (t[k] as { v: string }).v !== '';
    const punct = (k: number, v: string) => t[k]?.t === 'punct' && (t[k] as { v: string }).v === v;
    if (isVar(0) && (punct(1, ':=') || punct(1, '='))) {
      this.pos = 2;
      return { vars: [(t[0] as { v: string }).v], assign: punct(1, ':=') ? 'declare' : 'assign' };
    }
    if (isVar(0) && punct(1, ',') && isVar(2) && punct(3, ':=')) {
      this.pos = 4;
      return { vars: [(t[0] as { v: string }).v, (t[2] as { v: string }).v], assign: 'declare' };
    }
    return null;
  }

  private command(): Operand {
    const first = this.tokens[this.pos];
    if (first === undefined) throw new GoTemplateError(`${this.where}: empty command`);
    if (first.t === 'ident' && BUILTINS.has(first.v)) {
      this.pos++;
      const args: Operand[] = [];
      while (this.pos < this.tokens.length && !this.atPunct(')') && !this.atPunct('|')) args.push(this.operand());
      return { kind: 'call', fn: first.v, args };
    }
    return this.operand();
  }

  private atPunct(v: string): boolean {
    const t = this.tokens[this.pos];
    return t?.t === 'punct' && t.v === v;
  }

  private operand(): Operand {
    const t = this.tokens[this.pos++];
    switch (t?.t) {
      case 'str':
      case 'num':
        return { kind: 'literal', value: t.v };
      case 'field':
        return { kind: 'dot', fields: t.v };
      case 'var':
        return { kind: 'var', name: t.v, fields: t.fields };
      case 'ident':
        if (t.v === 'true' || t.v === 'false') return { kind: 'literal', value: t.v === 'true' };
        throw new GoTemplateError(`${this.where}: function or keyword "${t.v}" is not supported here`);
      case 'punct':
        if (t.v === '(') {
          const command = this.command();
          if (!this.atPunct(')')) throw new GoTemplateError(`${this.where}: missing ")"`);
          this.pos++;
          // (pipeline).Field
          const next = this.tokens[this.pos];
          let fields: string[] = [];
          if (next?.t === 'field' && next.v.length > 0) {
            fields = next.v;
            this.pos++;
          }
          return { kind: 'paren', pipe: { vars: [], assign: null, command }, fields };
        }
        throw new GoTemplateError(`${this.where}: unexpected "${t.v}"`);
      default:
        throw new GoTemplateError(`${this.where}: missing operand`);
    }
  }
}

/** Parses a template in the supported subset; throws GoTemplateError naming the offending action. */
export function parseGoTemplate(source: string): GoTemplate {
  const items = lex(source);
  let k = 0;
  const parser = (at: number) => new Parser(`template action at offset ${at}`);

  // Parses nodes until one of `stops` (keywords at the start of an action); returns the stop action's body.
  const list = (stops: string[]): { nodes: Node[]; stop: string | null } => {
    const nodes: Node[] = [];
    while (k < items.length) {
      const item = items[k++];
      if (item.kind === 'text') {
        nodes.push(item);
        continue;
      }
      const word = /^[a-z]+/.exec(item.body)?.[0] ?? '';
      if (stops.includes(word)) return { nodes, stop: item.body };
      if (word === 'else' || word === 'end') throw new GoTemplateError(`unexpected {{ ${item.body} }} at offset ${item.at}`);
      if (word === 'if') nodes.push(ifNode(item.body.slice(2), item.at));
      else if (word === 'range') nodes.push(rangeNode(item.body.slice(5), item.at));
      else if (KEYWORDS.has(word)) throw new GoTemplateError(`{{ ${word} }} at offset ${item.at} is not supported`);
      else nodes.push({ kind: 'action', pipe: parser(item.at).pipeline(item.body) });
    }
    if (stops.length > 0) throw new GoTemplateError(`missing {{ end }}`);
    return { nodes, stop: null };
  };

  const ifNode = (cond: string, at: number): Node => {
    const branches: { cond: Pipeline; body: Node[] }[] = [];
    let current = cond;
    for (;;) {
      const { nodes, stop } = list(['else', 'end']);
      branches.push({ cond: parser(at).pipeline(current), body: nodes });
      if (stop === 'end') return { kind: 'if', branches, otherwise: null };
      const rest = stop!.slice(4).trim();
      if (rest.startsWith('if ')) {
        current = rest.slice(3);
        continue;
      }
      if (rest !== '') throw new GoTemplateError(`{{ else ${rest} }} is not supported`);
      const tail = list(['end']);
      return { kind: 'if', branches, otherwise: tail.nodes };
    }
  };

  const rangeNode = (pipe: string, at: number): Node => {
    const parsed = parser(at).pipeline(pipe);
    if (parsed.assign === 'assign') throw new GoTemplateError(`range at offset ${at} assigns instead of declaring`);
    const { nodes, stop } = list(['else', 'end']);
    if (stop === 'end') return { kind: 'range', pipe: parsed, body: nodes, otherwise: null };
    if (stop!.trim() !== 'else') throw new GoTemplateError(`{{ ${stop} }} inside range is not supported`);
    return { kind: 'range', pipe: parsed, body: nodes, otherwise: list(['end']).nodes };
  };

  return new GoTemplate(list([]).nodes);
}

/** Go's notion of truth: false, 0, "", nil and empty lists/maps are false. */
function truthy(v: GoValue): boolean {
  if (v === null || v === undefined || v === false || v === 0 || v === '') return false;
  if (Array.isArray(v)) return v.length > 0;
  if (typeof v === 'object') return Object.keys(v).length > 0;
  return true;
}

function basicKind(v: GoValue): string {
  return v === null || v === undefined ? 'nil' : typeof v;
}

class Scope {
  private frames: Map<string, GoValue>[] = [new Map()];
  push(): void {
    this.frames.push(new Map());
  }
  pop(): void {
    this.frames.pop();
  }
  declare(name: string, value: GoValue): void {
    this.frames[this.frames.length - 1].set(name, value);
  }
  assign(name: string, value: GoValue): void {
    for (let i = this.frames.length - 1; i >= 0; i--) {
      if (this.frames[i].has(name)) {
        this.frames[i].set(name, value);
        return;
      }
    }
    throw new GoTemplateError(`undefined variable: $${name}`);
  }
  get(name: string): GoValue {
    for (let i = this.frames.length - 1; i >= 0; i--) if (this.frames[i].has(name)) return this.frames[i].get(name);
    throw new GoTemplateError(`undefined variable: $${name}`);
  }
}

export class GoTemplate {
  constructor(private readonly nodes: Node[]) {}

  /** Renders with `data` as dot and $. A field that the data does not have is an error (Go: missingkey=error). */
  execute(data: { [key: string]: GoValue }): string {
    const scope = new Scope();
    scope.declare('', data);
    let out = '';
    const run = (nodes: Node[], dot: GoValue): void => {
      for (const node of nodes) {
        switch (node.kind) {
          case 'text':
            out += node.text;
            break;
          case 'action': {
            const v = this.pipeline(node.pipe, dot, scope);
            if (node.pipe.assign === null) out += printValue(v);
            break;
          }
          case 'if': {
            const branch = node.branches.find((b) => truthy(this.pipeline(b.cond, dot, scope)));
            scope.push();
            run(branch ? branch.body : (node.otherwise ?? []), dot);
            scope.pop();
            break;
          }
          case 'range': {
            const list = this.evaluate(node.pipe.command, dot, scope);
            if (!Array.isArray(list)) throw new GoTemplateError(`range over ${basicKind(list)}, not a list`);
            if (list.length === 0) {
              scope.push();
              run(node.otherwise ?? [], dot);
              scope.pop();
            }
            list.forEach((item, i) => {
              scope.push();
              const [a, b] = node.pipe.vars;
              if (node.pipe.vars.length === 1) scope.declare(a, item);
              if (node.pipe.vars.length === 2) {
                scope.declare(a, i);
                scope.declare(b, item);
              }
              run(node.body, item);
              scope.pop();
            });
            break;
          }
        }
      }
    };
    run(this.nodes, data);
    return out;
  }

  private pipeline(p: Pipeline, dot: GoValue, scope: Scope): GoValue {
    const v = this.evaluate(p.command, dot, scope);
    if (p.assign === 'declare') scope.declare(p.vars[0], v);
    else if (p.assign === 'assign') scope.assign(p.vars[0], v);
    return v;
  }

  private evaluate(op: Operand, dot: GoValue, scope: Scope): GoValue {
    switch (op.kind) {
      case 'literal':
        return op.value;
      case 'dot':
        return fields(dot, op.fields);
      case 'var':
        return fields(scope.get(op.name), op.fields);
      case 'paren':
        return fields(this.evaluate(op.pipe.command, dot, scope), op.fields);
      case 'call':
        return this.call(op.fn, op.args, dot, scope);
    }
  }

  private call(fn: string, args: Operand[], dot: GoValue, scope: Scope): GoValue {
    const arity = (min: number, max = min) => {
      if (args.length < min || args.length > max) throw new GoTemplateError(`${fn} takes ${min === max ? min : `${min} to ${max}`} arguments, got ${args.length}`);
    };
    const ev = (a: Operand) => this.evaluate(a, dot, scope);
    switch (fn) {
      case 'and':
      case 'or': {
        arity(1, Infinity);
        let v: GoValue = undefined;
        for (const a of args) {
          v = ev(a);
          if (truthy(v) === (fn === 'or')) return v; // short-circuits, as Go 1.18+ does
        }
        return v;
      }
      case 'not':
        arity(1);
        return !truthy(ev(args[0]));
      case 'eq':
      case 'ne': {
        arity(2, fn === 'eq' ? Infinity : 2);
        const [x, ...ys] = args.map(ev);
        for (const y of [x, ...ys]) {
          if (!['string', 'number', 'boolean'].includes(typeof y)) throw new GoTemplateError(`${fn}: cannot compare ${basicKind(y)}`);
        }
        for (const y of ys) if (typeof y !== typeof x) throw new GoTemplateError(`${fn}: incompatible types ${typeof x} and ${typeof y}`);
        const equal = ys.some((y) => y === x);
        return fn === 'eq' ? equal : !equal;
      }
      case 'len': {
        arity(1);
        const v = ev(args[0]);
        if (typeof v === 'string') return Buffer.byteLength(v, 'utf8');
        if (Array.isArray(v)) return v.length;
        if (v !== null && typeof v === 'object') return Object.keys(v).length;
        throw new GoTemplateError(`len of ${basicKind(v)}`);
      }
      case 'slice': {
        arity(1, 3);
        const [v, ...bounds] = args.map(ev);
        if (!Array.isArray(v)) throw new GoTemplateError('slice: only lists are supported');
        const [lo = 0, hi = v.length] = bounds as number[];
        if (!Number.isInteger(lo) || !Number.isInteger(hi) || lo < 0 || hi > v.length || lo > hi) throw new GoTemplateError(`slice: index out of range [${lo}:${hi}] of ${v.length}`);
        return v.slice(lo, hi);
      }
      case 'index': {
        arity(2);
        const [v, i] = args.map(ev);
        if (Array.isArray(v) && typeof i === 'number') {
          if (i < 0 || i >= v.length) throw new GoTemplateError(`index out of range: ${i}`);
          return v[i];
        }
        if (v !== null && typeof v === 'object' && !Array.isArray(v) && typeof i === 'string') return v[i];
        throw new GoTemplateError(`cannot index ${basicKind(v)} with ${basicKind(i)}`);
      }
    }
    throw new GoTemplateError(`function "${fn}" not defined`);
  }
}

function fields(v: GoValue, names: string[]): GoValue {
  let cur = v;
  for (const name of names) {
    if (cur === null || cur === undefined || typeof cur !== 'object' || Array.isArray(cur)) throw new GoTemplateError(`can't evaluate field ${name} in ${basicKind(cur)}`);
    if (!(name in cur)) throw new GoTemplateError(`can't evaluate field ${name}`);
    cur = cur[name];
  }
  return cur;
}

function printValue(v: GoValue): string {
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (v === null || v === undefined) return '<no value>';
  throw new GoTemplateError('printing lists or maps is not supported');
}

/** `text` as a Go string literal, escaping what a Modelfile cannot carry raw (it drops non-printable characters). */
export function quoteGo(text: string): string {
  let out = '"';
  for (const ch of text) {
    const code = ch.codePointAt(0)!;
    if (ch === '"' || ch === '\\') out += '\\' + ch;
    else if (ch === '\n') out += '\\n';
    else if (ch === '\t') out += '\\t';
    else if (/^[\p{L}\p{M}\p{N}\p{P}\p{S} ]$/u.test(ch)) out += ch;
    else out += code > 0xffff ? `\\U${code.toString(16).padStart(8, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
  }
  return out + '"';
}
