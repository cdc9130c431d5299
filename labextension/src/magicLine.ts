/**
 * Editing a cell's `%%parallel` / `%%threaded` line: reading it, setting or
 * switching the magic (keeping the options the new magic takes), adding
 * `explain`, and the one small text edit that applies a change.  Which magic
 * takes which option comes from magicOptions.json, the mirror of the Python
 * option table.
 */
import magicOptions from './magicOptions.json';

export type Magic = 'parallel' | 'threaded';

const MAGIC_LINE = /^%%(parallel|threaded)(?:\s+(.*))?$/;

function optionKey(word: string): string {
  const eq = word.indexOf('=');
  return eq < 0 ? word : word.slice(0, eq);
}

/** Which magics take each option, by name (a Map: option words are not object keys). */
const MAGICS_OF = new Map<string, string[]>(Object.entries(magicOptions.options));

/**
 * Whether `magic` takes the option `word`.  A word the table does not know
 * (a typo, an option of a newer parloop) is left for the magic to judge.
 */
function takes(magic: Magic, word: string): boolean {
  return MAGICS_OF.get(optionKey(word))?.includes(magic) ?? true;
}

function splitLines(source: string): { first: number; lines: string[] } {
  const lines = source.split('\n');
  // IPython drops leading blank lines before it looks for a cell magic.
  let first = 0;
  while (first < lines.length - 1 && lines[first].trim() === '') {
    first++;
  }
  return { first, lines };
}

/** The cell's parloop magic line, parsed, or null when it has none. */
export function readMagicLine(source: string): { magic: Magic; options: string[] } | null {
  const { first, lines } = splitLines(source);
  const m = MAGIC_LINE.exec(lines[first].trim());
  if (!m) {
    return null;
  }
  return { magic: m[1] as Magic, options: (m[2] ?? '').split(/\s+/).filter(Boolean) };
}

/**
 * The cell's source with `%%magic` as its first line.  An existing
 * `%%parallel` / `%%threaded` line is replaced: its options that the new magic
 * also takes are kept, the other magic's own options are dropped, and the
 * `defaults` (from the settings) fill in keys the line does not give.
 * Otherwise the line is inserted above the code.
 */
export function setMagicLine(source: string, magic: Magic, defaults = ''): string {
  const current = readMagicLine(source);
  const kept = (current?.options ?? []).filter(w => takes(magic, w));
  const keys = new Set(kept.map(optionKey));
  const added = defaults
    .split(/\s+/)
    .filter(Boolean)
    .filter(w => !keys.has(optionKey(w)) && takes(magic, w));
  const line = ['%%' + magic, ...kept, ...added].join(' ');
  const { first, lines } = splitLines(source);
  if (current) {
    lines[first] = line;
    return lines.join('\n');
  }
  return source === '' ? line + '\n' : line + '\n' + source;
}

/** The source to run for "Explain parallel loop": the cell with `explain` on its magic line. */
export function explainSource(source: string, defaultMagic: Magic, defaults = ''): string {
  const current = readMagicLine(source);
  const withMagic = current ? source : setMagicLine(source, defaultMagic, defaults);
  const { first, lines } = splitLines(withMagic);
  const parsed = readMagicLine(withMagic)!;
  if (!parsed.options.includes('explain')) {
    lines[first] = lines[first].trimEnd() + ' explain';
  }
  return lines.join('\n');
}

/**
 * The one replacement that turns `before` into `after`: [from, to) of
 * `before` becomes `text`.  Applying only that keeps the undo history and the
 * cursor of the rest of the cell as they were.
 */
export function minimalEdit(
  before: string,
  after: string
): { from: number; to: number; text: string } {
  let p = 0;
  const n = Math.min(before.length, after.length);
  while (p < n && before[p] === after[p]) {
    p++;
  }
  let q = 0;
  while (q < n - p && before[before.length - 1 - q] === after[after.length - 1 - q]) {
    q++;
  }
  return { from: p, to: before.length - q, text: after.slice(p, after.length - q) };
}
