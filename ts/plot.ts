// `nanogpt-rs plot`: turns a run's log.jsonl into one self-contained HTML page (inline SVG, no scripts)
// with the loss curves, the learning rate and the gradient norm, to open in any browser.
import { join } from 'node:path';
import { UserError } from './errors.ts';
import { writeFileAtomic } from './files.ts';
import { latestRun, logFileName, readRunLog, type EvalRecord, type TrainRecord } from './telemetry.ts';

interface Series {
  label: string;
  color: string;
  points: Array<[number, number]>;
  /** Markers instead of a line: few points (evaluations). */
  dots?: boolean;
}

const width = 760;
const height = 300;
const margin = { left: 70, right: 20, top: 30, bottom: 40 };

export function plot(outDir: string, file = join(outDir, 'plot.html')): string {
  const records = latestRun(readRunLog(outDir));
  const train = records.filter((r): r is TrainRecord => r.kind === 'train');
  const evals = records.filter((r): r is EvalRecord => r.kind === 'eval');
  if (train.length === 0 && evals.length === 0) {
    throw new UserError(`no training records in ${join(outDir, logFileName)}; train with --out_dir=${outDir} first`);
  }
  const charts = [
    chart('loss', [
      { label: 'train loss (logged step)', color: '#9ab', points: train.map((r) => [r.iter, r.loss]) },
      { label: 'train loss (eval)', color: '#1f77b4', points: evals.map((r) => [r.iter, r.train_loss]), dots: true },
      { label: 'val loss (eval)', color: '#d62728', points: evals.map((r) => [r.iter, r.val_loss]), dots: true },
    ]),
    chart('learning rate', [{ label: 'lr', color: '#2ca02c', points: train.map((r) => [r.iter, r.lr]) }]),
    chart('gradient norm (before clipping)', [{ label: 'grad norm', color: '#9467bd', points: train.map((r) => [r.iter, r.grad_norm]) }]),
  ];
  const best = evals.reduce<EvalRecord | null>((b, r) => (b === null || r.val_loss < b.val_loss ? r : b), null);
  const summary = best ? `best val loss ${best.val_loss.toFixed(4)} at iteration ${best.iter}` : 'no evaluation yet';
  const html = `<!doctype html>
<html><head><meta charset="utf-8"><title>nanogpt-rs: ${escape(outDir)}</title>
<style>body{font:14px system-ui,sans-serif;margin:24px;color:#222}svg{display:block;margin:12px 0 28px}</style></head>
<body><h1>${escape(outDir)}</h1><p>${escape(summary)}; ${train.length} logged steps, ${evals.length} evaluations.</p>
${charts.join('\n')}
</body></html>
`;
  writeFileAtomic(file, html);
  return file;
}

function chart(title: string, series: Series[]): string {
  const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  if (all.length === 0) return `<h2>${escape(title)}</h2><p>no data</p>`;
  const [x0, x1] = extent(all.map(([x]) => x));
  const [y0, y1] = extent(all.map(([, y]) => y));
  const sx = (x: number) => margin.left + ((x - x0) / (x1 - x0 || 1)) * (width - margin.left - margin.right);
  const sy = (y: number) => height - margin.bottom - ((y - y0) / (y1 - y0 || 1)) * (height - margin.top - margin.bottom);
  const marks = series.map((s) => {
    if (s.dots) return s.points.map(([x, y]) => `<circle cx="${sx(x).toFixed(1)}" cy="${sy(y).toFixed(1)}" r="3" fill="${s.color}"/>`).join('');
    const path = s.points.map(([x, y], i) => `${i ? 'L' : 'M'}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join('');
    return `<path d="${path}" fill="none" stroke="${s.color}" stroke-width="1.2"/>`;
  });
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => {
    const y = y0 + f * (y1 - y0);
    const x = x0 + f * (x1 - x0);
    return `<text x="${margin.left - 6}" y="${sy(y) + 4}" text-anchor="end">${format(y)}</text>` +
      `<line x1="${margin.left}" x2="${width - margin.right}" y1="${sy(y)}" y2="${sy(y)}" stroke="#eee"/>` +
      `<text x="${sx(x)}" y="${height - margin.bottom + 18}" text-anchor="middle">${Math.round(x)}</text>`;
  });
  const legend = series.map((s, i) => `<text x="${margin.left + 10 + i * 210}" y="18" fill="${s.color}">■ ${escape(s.label)}</text>`);
  return `<h2>${escape(title)}</h2>
<svg width="${width}" height="${height}" font-size="11" xmlns="http://www.w3.org/2000/svg">${ticks.join('')}${legend.join('')}${marks.join('')}
<text x="${(width + margin.left) / 2}" y="${height - 6}" text-anchor="middle">iteration</text></svg>`;
}

function extent(values: number[]): [number, number] {
  // A loop, not Math.min(...values): a long run's log has more points than a call can take arguments.
  let [lo, hi] = [Infinity, -Infinity];
  for (const v of values) {
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  return [lo, hi];
}

function format(v: number): string {
  return Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(3) : v.toExponential(1);
}

function escape(text: string): string {
  return text.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c] ?? c);
}
