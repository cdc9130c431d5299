// ESLint for the extension's TypeScript (`npm run lint`, also run by
// tests/test_labextension.py): the recommended JavaScript and typescript-eslint
// rules, with every rule about layout left to prettier (.prettierrc).
import js from '@eslint/js';
import prettier from 'eslint-config-prettier';
import { defineConfig } from 'eslint/config';
import tseslint from 'typescript-eslint';

export default defineConfig(
  { ignores: ['lib/', 'dist/', 'node_modules/'] },
  {
    files: ['src/**/*.ts'],
    extends: [js.configs.recommended, tseslint.configs.recommended, prettier],
    rules: {
      // Braces on every branch, as the code has them; prettier leaves them be.
      curly: 'error',
      eqeqeq: ['error', 'smart']
    }
  }
);
