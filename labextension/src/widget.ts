/**
 * Draws a run report: a header with the totals, then the timeline on one
 * canvas (one lane per worker, one block per chunk), the notes and the first
 * errors.  One canvas rather than an element per chunk, so 64 workers ×
 * thousands of chunks draw in milliseconds; hovering finds the chunk by
 * binary search (timelineLayout.ts hitTest) and shows its text in a small overlay.
 */
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

import { Report, parseReport } from './report';
import { chunkTooltip, formatCount, headerParts } from './reportText';
import { Layout, formatTick, hitTest, layoutTimeline } from './timelineLayout';

const LABEL_WIDTH = 110;
const STATS_WIDTH = 90;
const ERRORS_SHOWN = 10;

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

/** Fit `text` into `width` pixels, cutting it with an ellipsis. */
function fitText(ctx: CanvasRenderingContext2D, text: string, width: number): string {
  if (ctx.measureText(text).width <= width) {
    return text;
  }
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + '…').width <= width) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return text.slice(0, lo) + '…';
}

/** The renderer of `application/vnd.parloop.report+json`. */
export class ReportWidget extends Widget implements IRenderMime.IRenderer {
  constructor(options: IRenderMime.IRendererOptions) {
    super();
    this._mimeType = options.mimeType;
    this.addClass('parloop-report');
  }

  renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    try {
      this._report = parseReport(model.data[this._mimeType]);
      this._build(this._report);
    } catch (reason) {
      // A bad bundle must not break the notebook: say so in place and in the console.
      console.error(`parloop: cannot render the run report: ${reason}`);
      this._report = null;
      this.node.replaceChildren(
        el('div', 'parloop-report-error', `parloop: this run report cannot be shown (${reason})`)
      );
    }
    return Promise.resolve();
  }

  dispose(): void {
    this._resize?.disconnect();
    this._theme?.disconnect();
    if (this._frame) {
      cancelAnimationFrame(this._frame);
    }
    super.dispose();
  }

  protected onAfterAttach(): void {
    this._schedule();
  }

  private _build(r: Report): void {
    const header = el('div', 'parloop-report-header');
    header.appendChild(el('span', 'parloop-report-title', r.magic ? `%%${r.magic}` : 'parloop'));
    for (const part of headerParts(r)) {
      header.appendChild(el('span', 'parloop-report-part', part));
    }
    if (r.errors.length) {
      const n = r.errors.length;
      header.appendChild(
        el(
          'span',
          'parloop-report-part parloop-mod-error',
          `${formatCount(n)} error${n === 1 ? '' : 's'}`
        )
      );
    }
    if (r.interrupted) {
      header.appendChild(el('span', 'parloop-report-part parloop-mod-error', 'interrupted'));
    }

    const timeline = el('div', 'parloop-timeline');
    const failedMarks = r.chunks.reduce((n, c) => n + c.failed.length, 0);
    const retried = r.chunks.filter(c => c.retried).length;
    this._canvas = el('canvas', 'parloop-timeline-canvas');
    this._canvas.setAttribute('role', 'img');
    this._tooltip = el('div', 'parloop-timeline-tooltip');
    this._highlight = el('div', 'parloop-timeline-highlight');
    this._tooltip.hidden = true;
    this._highlight.hidden = true;
    timeline.append(this._canvas, this._highlight, this._tooltip);
    this._timeline = timeline;
    this._canvas.addEventListener('mousemove', this._onMove);
    this._canvas.addEventListener('mouseleave', this._onLeave);

    const children: HTMLElement[] = [header, timeline];
    if (r.notes.length) {
      const notes = el('ul', 'parloop-report-notes');
      for (const note of r.notes) {
        notes.appendChild(el('li', '', note));
      }
      children.push(notes);
    }
    if (r.errors.length) {
      const errors = el('ul', 'parloop-report-errors');
      for (const e of r.errors.slice(0, ERRORS_SHOWN)) {
        const values = e.values ? ` (${e.values})` : '';
        errors.appendChild(el('li', '', `iteration ${e.index}${values}: ${e.type}: ${e.message}`));
      }
      if (r.errors.length > ERRORS_SHOWN) {
        errors.appendChild(el('li', '', `… and ${r.errors.length - ERRORS_SHOWN} more`));
      }
      children.push(errors);
    }
    this.node.replaceChildren(...children);

    // Counts for tests and assistive technology: what the canvas shows.
    this._timelineLayout = null;
    this._stale = true;
    const lanes = new Set([...r.workers.map(w => w.name), ...r.chunks.map(c => c.worker)]).size;
    timeline.dataset.lanes = String(lanes);
    timeline.dataset.blocks = String(r.chunks.length);
    timeline.dataset.failed = String(failedMarks);
    timeline.dataset.retried = String(retried);
    this._canvas.setAttribute(
      'aria-label',
      `Timeline of ${lanes} workers and ${r.chunks.length} chunks` +
        (failedMarks ? `, ${failedMarks} failed iterations` : '') +
        (retried ? `, ${retried} re-run chunks` : '')
    );

    this._resize?.disconnect();
    this._resize = new ResizeObserver(() => this._schedule());
    this._resize.observe(timeline);
    if (!this._theme) {
      this._theme = new MutationObserver(() => {
        this._stale = true;
        this._schedule();
      });
      this._theme.observe(document.body, {
        attributes: true,
        attributeFilter: ['data-jp-theme-name', 'data-jp-theme-light']
      });
    }
    this._schedule();
  }

  private _schedule(): void {
    if (this._frame || !this._report) {
      return;
    }
    this._frame = requestAnimationFrame(() => {
      this._frame = 0;
      try {
        this._draw();
      } catch (reason) {
        console.error(`parloop: cannot draw the timeline: ${reason}`);
      }
    });
  }

  private _draw(): void {
    const r = this._report;
    const timeline = this._timeline;
    const canvas = this._canvas;
    if (!r || !timeline || !canvas) {
      return;
    }
    const width = Math.floor(timeline.clientWidth);
    if (width <= 0) {
      return; // not attached or hidden: drawn when it gets a size
    }
    if (this._timelineLayout && this._drawnWidth === width && !this._stale) {
      return; // a resize that did not change the width
    }
    this._stale = false;
    const layout = layoutTimeline(r, { width, labelWidth: LABEL_WIDTH, statsWidth: STATS_WIDTH });
    this._timelineLayout = layout;
    this._drawnWidth = width;

    const ratio = window.devicePixelRatio || 1;
    canvas.style.width = `${layout.width}px`;
    canvas.style.height = `${layout.height}px`;
    canvas.width = Math.round(layout.width * ratio);
    canvas.height = Math.round(layout.height * ratio);
    const ctx = canvas.getContext('2d');
    if (!ctx) {
      return;
    }
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    const style = getComputedStyle(this.node);
    const css = (name: string, fallback: string) => style.getPropertyValue(name).trim() || fallback;
    const colors = {
      shade0: css('--jp-brand-color1', '#1976d2'),
      shade1: css('--jp-brand-color2', '#64b5f6'),
      failed: css('--jp-error-color1', '#d32f2f'),
      retried: css('--jp-layout-color4', '#757575'),
      lane: css('--jp-layout-color2', '#eeeeee'),
      grid: css('--jp-border-color2', '#e0e0e0'),
      text: css('--jp-ui-font-color1', 'rgba(0,0,0,0.87)'),
      muted: css('--jp-ui-font-color2', 'rgba(0,0,0,0.54)')
    };
    const font = css('--jp-ui-font-family', 'sans-serif');
    const plotRight = layout.width - STATS_WIDTH;

    ctx.clearRect(0, 0, layout.width, layout.height);
    // Every other lane tinted, the grid at the ticks.
    ctx.fillStyle = colors.lane;
    for (let i = 1; i < layout.lanes.length; i += 2) {
      ctx.fillRect(layout.x0, layout.lanes[i].y, plotRight - layout.x0, layout.laneHeight);
    }
    ctx.fillStyle = colors.grid;
    for (const t of layout.ticks) {
      ctx.fillRect(Math.round(layout.x0 + t * layout.scale), 0, 1, layout.axisY + 4);
    }

    // Blocks, batched by colour.
    for (const shade of [0, 1] as const) {
      ctx.fillStyle = shade ? colors.shade1 : colors.shade0;
      for (const b of layout.blocks) {
        if (b.shade === shade) {
          ctx.fillRect(b.x, b.y, b.w, b.h);
        }
      }
    }
    // Grey: a band along the top and the left edge of a chunk that was re-run here.
    ctx.fillStyle = colors.retried;
    for (const b of layout.blocks) {
      if (b.retried) {
        const band = Math.max(2, Math.floor(b.h / 3));
        ctx.fillRect(b.x, b.y, b.w, band);
        ctx.fillRect(b.x, b.y, Math.min(b.w, 2), b.h);
      }
    }
    // Red: a mark at each failed iteration.
    ctx.fillStyle = colors.failed;
    for (const b of layout.blocks) {
      for (const fx of b.failedX) {
        ctx.fillRect(Math.min(fx, b.x + b.w - 2), b.y - 1, 2, b.h + 2);
      }
    }

    // Lane names on the left, totals on the right; at most one label per 11 px.
    const fontSize = Math.min(11, Math.max(8, layout.laneHeight - 4));
    ctx.font = `${fontSize}px ${font}`;
    ctx.textBaseline = 'middle';
    const every = Math.max(1, Math.ceil(11 / layout.laneHeight));
    layout.lanes.forEach((lane, i) => {
      if (i % every) {
        return;
      }
      const mid = lane.y + layout.laneHeight / 2;
      ctx.fillStyle = colors.text;
      ctx.textAlign = 'left';
      ctx.fillText(fitText(ctx, lane.name, LABEL_WIDTH - 8), 2, mid);
      ctx.fillStyle = lane.failed ? colors.failed : colors.muted;
      ctx.textAlign = 'right';
      const share = r.wall > 0 ? ` · ${Math.round((100 * lane.busy) / r.wall)}%` : '';
      ctx.fillText(
        fitText(ctx, `${formatCount(lane.iterations)} it${share}`, STATS_WIDTH - 6),
        layout.width - 2,
        mid
      );
    });

    // The time axis.
    ctx.fillStyle = colors.muted;
    ctx.font = `10px ${font}`;
    ctx.textBaseline = 'top';
    layout.ticks.forEach((t, i) => {
      ctx.textAlign = i === 0 ? 'left' : 'center';
      ctx.fillText(formatTick(t, layout.tMax), layout.x0 + t * layout.scale, layout.axisY + 6);
    });
    ctx.textAlign = 'right';
    ctx.fillText('time', layout.x0 - 6, layout.axisY + 6);
    this._onLeave();
  }

  private _onMove = (event: MouseEvent): void => {
    const layout = this._timelineLayout;
    const r = this._report;
    if (!layout || !r || !this._canvas || !this._tooltip || !this._highlight) {
      return;
    }
    const rect = this._canvas.getBoundingClientRect();
    const x = event.clientX - rect.left;
    const y = event.clientY - rect.top;
    const k = hitTest(layout, x, y);
    if (k < 0) {
      this._onLeave();
      return;
    }
    const b = layout.blocks[k];
    this._tooltip.textContent = chunkTooltip(r.chunks[b.chunk]);
    this._tooltip.hidden = false;
    const tipWidth = this._tooltip.offsetWidth;
    const left = Math.min(x + 12, Math.max(0, layout.width - tipWidth - 4));
    this._tooltip.style.left = `${left}px`;
    this._tooltip.style.top = `${Math.min(y + 14, layout.height)}px`;
    Object.assign(this._highlight.style, {
      left: `${b.x - 1}px`,
      top: `${b.y - 1}px`,
      width: `${b.w + 2}px`,
      height: `${b.h + 2}px`
    });
    this._highlight.hidden = false;
  };

  private _onLeave = (): void => {
    if (this._tooltip) {
      this._tooltip.hidden = true;
    }
    if (this._highlight) {
      this._highlight.hidden = true;
    }
  };

  private _mimeType: string;
  private _report: Report | null = null;
  private _timelineLayout: Layout | null = null;
  private _drawnWidth = 0;
  /** Set when the next draw must happen even at the same width (new data, new theme). */
  private _stale = true;
  private _frame = 0;
  private _timeline: HTMLDivElement | null = null;
  private _canvas: HTMLCanvasElement | null = null;
  private _tooltip: HTMLDivElement | null = null;
  private _highlight: HTMLDivElement | null = null;
  private _resize: ResizeObserver | null = null;
  private _theme: MutationObserver | null = null;
}
