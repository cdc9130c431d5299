import { defineConfig } from 'vitest/config';

// Unit tests of the pure modules (report, reportText, timelineLayout,
// magicLine); no DOM needed.  src/__tests__/sampleReport.ts is their fixture.
export default defineConfig({
  test: { include: ['src/__tests__/*.spec.ts'], environment: 'node' }
});
