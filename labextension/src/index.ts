/**
 * Wires the plugin: the commands "Parallelize loop (processes)",
 * "Parallelize loop (threads)" and "Explain parallel loop" (command palette
 * and cell toolbar) and their settings.  The report renderer is the MIME
 * extension in mime.ts.  Any failure is logged as "parloop: ..." and
 * swallowed: JupyterLab must keep working.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { CodeCell } from '@jupyterlab/cells';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { OutputArea } from '@jupyterlab/outputarea';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { LabIcon } from '@jupyterlab/ui-components';

import { Magic, explainSource, minimalEdit, setMagicLine } from './magicLine';

const PLUGIN_ID = 'parloop:plugin';

export const CommandIDs = {
  processes: 'parloop:parallelize-processes',
  threads: 'parloop:parallelize-threads',
  explain: 'parloop:explain'
};

/** Mirrors schema/plugin.json. */
interface Settings {
  defaultMagic: Magic;
  parallelOptions: string;
  threadedOptions: string;
}

const DEFAULTS: Settings = { defaultMagic: 'parallel', parallelOptions: '', threadedOptions: '' };

// Loading the extension in the kernel before "explain", so that it works on a
// fresh kernel; load_extension returns quietly when it is already loaded.
const LOAD_EXTENSION = "get_ipython().extension_manager.load_extension('parloop')";

const processesIcon = new LabIcon({
  name: 'parloop:processes',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">' +
    '<g class="jp-icon3" fill="#616161">' +
    '<rect x="1" y="2" width="6" height="3" rx="0.5"/>' +
    '<rect x="8" y="2" width="7" height="3" rx="0.5"/>' +
    '<rect x="1" y="6.5" width="9" height="3" rx="0.5"/>' +
    '<rect x="11" y="6.5" width="4" height="3" rx="0.5"/>' +
    '<rect x="1" y="11" width="4" height="3" rx="0.5"/>' +
    '<rect x="6" y="11" width="8" height="3" rx="0.5"/>' +
    '</g></svg>'
});

const threadsIcon = new LabIcon({
  name: 'parloop:threads',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">' +
    '<g class="jp-icon3" fill="none" stroke="#616161" stroke-width="1.5" stroke-linecap="round">' +
    '<path d="M1 3.5 C5 1.5 7 5.5 11 3.5 S15 3.5 15 3.5"/>' +
    '<path d="M1 8 C5 6 7 10 11 8 S15 8 15 8"/>' +
    '<path d="M1 12.5 C5 10.5 7 14.5 11 12.5 S15 12.5 15 12.5"/>' +
    '</g></svg>'
});

function guard<T>(what: string, f: () => T): T | undefined {
  try {
    return f();
  } catch (reason) {
    console.error(`parloop: ${what}: ${reason}`);
    return undefined;
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: "Commands that parallelize a notebook cell's for loop with parloop.",
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    settingRegistry: ISettingRegistry | null
  ) => {
    let settings: Settings = { ...DEFAULTS };
    if (settingRegistry) {
      settingRegistry
        .load(PLUGIN_ID)
        .then(loaded => {
          const update = () => {
            settings = { ...DEFAULTS, ...(loaded.composite as Partial<Settings>) };
          };
          update();
          loaded.changed.connect(update);
        })
        .catch(reason => console.error(`parloop: cannot load the settings: ${reason}`));
    }
    const optionsFor = (magic: Magic) =>
      magic === 'parallel' ? settings.parallelOptions : settings.threadedOptions;

    const activeCodeCell = (): { panel: NotebookPanel; cell: CodeCell } | null => {
      const panel = tracker.currentWidget;
      const cell = panel?.content.activeCell;
      return panel && cell instanceof CodeCell ? { panel, cell } : null;
    };

    const setMagic = (magic: Magic) =>
      guard(`cannot set the %%${magic} line`, () => {
        const active = activeCodeCell();
        if (!active) {
          return;
        }
        const shared = active.cell.model.sharedModel;
        const before = shared.getSource();
        const edit = minimalEdit(before, setMagicLine(before, magic, optionsFor(magic)));
        if (edit.from !== edit.to || edit.text) {
          shared.updateSource(edit.from, edit.to, edit.text);
        }
      });

    app.commands.addCommand(CommandIDs.processes, {
      label: 'Parallelize loop (processes)',
      caption: "Run this cell's for loop on processes: %%parallel",
      icon: args => (args.toolbar ? processesIcon : undefined),
      isEnabled: () => activeCodeCell() !== null,
      execute: () => setMagic('parallel')
    });
    app.commands.addCommand(CommandIDs.threads, {
      label: 'Parallelize loop (threads)',
      caption: "Run this cell's for loop on threads: %%threaded",
      icon: args => (args.toolbar ? threadsIcon : undefined),
      isEnabled: () => activeCodeCell() !== null,
      execute: () => setMagic('threaded')
    });
    app.commands.addCommand(CommandIDs.explain, {
      label: 'Explain parallel loop',
      caption: 'Show how parloop would run this cell, without running it',
      isEnabled: () => activeCodeCell() !== null,
      execute: async () => {
        try {
          const active = activeCodeCell();
          if (!active) {
            return;
          }
          const { panel, cell } = active;
          const code = explainSource(
            cell.model.sharedModel.getSource(),
            settings.defaultMagic,
            optionsFor(settings.defaultMagic)
          );
          const context = panel.sessionContext;
          await context.ready;
          const kernel = context.session?.kernel;
          if (!kernel) {
            console.error('parloop: Explain parallel loop needs a running kernel');
            return;
          }
          await kernel.requestExecute({ code: LOAD_EXTENSION, silent: true, store_history: false })
            .done;
          // The cell's text stays as it is; the analysis lands in its output.
          const reply = await OutputArea.execute(code, cell.outputArea, context);
          if (reply?.content.status === 'ok' && !cell.isDisposed) {
            cell.model.executionCount = reply.content.execution_count;
          }
        } catch (reason) {
          console.error(`parloop: Explain parallel loop failed: ${reason}`);
        }
      }
    });

    if (palette) {
      for (const command of Object.values(CommandIDs)) {
        palette.addItem({ command, category: 'Parloop' });
      }
    }
  }
};

export default plugin;
