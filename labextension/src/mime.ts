/**
 * The report renderer as a MIME extension, so JupyterLab registers it before
 * any notebook opens, and a saved notebook renders its reports without a
 * kernel.  `safe`: it draws from JSON and runs nothing, so it is also chosen
 * in untrusted notebooks, where the bundle's text/html fallback would be
 * sanitized.
 */
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';

import { REPORT_MIME } from './report';
import { ReportWidget } from './widget';

export const rendererFactory: IRenderMime.IRendererFactory = {
  safe: true,
  mimeTypes: [REPORT_MIME],
  createRenderer: options => new ReportWidget(options)
};

const extension: IRenderMime.IExtension = {
  id: 'parloop:report',
  description: 'Renders a parloop run report as a timeline of chunks per worker.',
  rendererFactory,
  // Ahead of text/html (rank 50), which the bundle carries for other frontends.
  rank: 0,
  dataType: 'json'
};

export default extension;
