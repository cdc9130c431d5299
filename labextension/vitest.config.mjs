import { defineConfig } from 'vitest/config';

// Unit tests of the pure functions in src/format.ts; no DOM needed.
export default defineConfig({
  test: { include: ['src/__tests__/*.spec.ts'], environment: 'node' }
});
