import { describe, expect, it } from 'vitest';

import { explainSource, minimalEdit, readMagicLine, setMagicLine } from '../magicLine';
import magicOptions from '../magicOptions.json';

describe('the magic line', () => {
  const loop = 'for i in range(3):\n    out[i] = f(i)\n';

  it('inserts a magic line above the code', () => {
    expect(setMagicLine(loop, 'parallel')).toBe('%%parallel\n' + loop);
    expect(setMagicLine(loop, 'threaded', 'threads=8')).toBe('%%threaded threads=8\n' + loop);
    expect(setMagicLine('', 'threaded')).toBe('%%threaded\n');
  });

  it('replaces an existing line, keeping the options both magics take', () => {
    const cell = '%%threaded threads=8 chunksize=4 seed=1\n' + loop;
    expect(setMagicLine(cell, 'parallel')).toBe('%%parallel chunksize=4 seed=1\n' + loop);
    expect(
      setMagicLine('%%parallel processes=4 retries=2\n' + loop, 'threaded', 'threads=16')
    ).toBe('%%threaded threads=16\n' + loop);
  });

  it('lets options on the line win over the defaults, and is idempotent', () => {
    const cell = '%%parallel processes=2\n' + loop;
    expect(setMagicLine(cell, 'parallel', 'processes=8 on_error=collect')).toBe(
      '%%parallel processes=2 on_error=collect\n' + loop
    );
    const once = setMagicLine(loop, 'parallel', 'processes=8');
    expect(setMagicLine(once, 'parallel', 'processes=8')).toBe(once);
  });

  it('looks past leading blank lines, as IPython does', () => {
    expect(setMagicLine('\n\n%%threaded\n' + loop, 'parallel')).toBe('\n\n%%parallel\n' + loop);
    expect(readMagicLine('\n%%threaded threads=2\nx')).toEqual({
      magic: 'threaded',
      options: ['threads=2']
    });
    expect(readMagicLine('%%time\nx')).toBeNull();
  });

  it('adds explain once, with the default magic when there is none', () => {
    expect(explainSource(loop, 'parallel')).toBe('%%parallel explain\n' + loop);
    expect(explainSource('%%threaded threads=2\n' + loop, 'parallel')).toBe(
      '%%threaded threads=2 explain\n' + loop
    );
    expect(explainSource('%%threaded explain\n' + loop, 'parallel')).toBe(
      '%%threaded explain\n' + loop
    );
  });

  it('edits only what changed', () => {
    expect(minimalEdit('%%threaded\nfor', '%%parallel\nfor')).toEqual({
      from: 2,
      to: 10,
      text: 'parallel'
    });
    expect(minimalEdit('for', '%%parallel\nfor')).toEqual({ from: 0, to: 0, text: '%%parallel\n' });
    expect(minimalEdit('abc', 'abc')).toEqual({ from: 3, to: 3, text: '' });
    expect(minimalEdit('aa', 'aaa')).toEqual({ from: 2, to: 2, text: 'a' });
  });

  it('drops every option of the other magic, as magicOptions.json says', () => {
    for (const [option, magics] of Object.entries(magicOptions.options)) {
      const cell = `%%parallel ${option}=1\n` + loop;
      const kept = setMagicLine(cell, 'threaded').startsWith(`%%threaded ${option}=1\n`);
      expect([option, kept]).toEqual([option, magics.includes('threaded')]);
    }
  });

  it('keeps words it does not know, even ones named like object properties', () => {
    const cell = '%%threaded threads=2 constructor toString=1 colour=red\n' + loop;
    expect(setMagicLine(cell, 'parallel')).toBe(
      '%%parallel constructor toString=1 colour=red\n' + loop
    );
  });
});
