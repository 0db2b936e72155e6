// The FinOps console: fetches GET /admin/console for the chosen period and draws each panel
// as plain DOM and hand-drawn SVG. It computes no figure of its own beyond sums and ratios of
// what the server sent; each panel prints the server's `source` for its numbers.
// Every value is set as text (never as HTML): tag values come from callers.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const COLORS = ['#2e6fdb', '#e07a1f', '#2f9e6f', '#c0392b', '#8e5cc9', '#8c6d46', '#d45a9e', '#6b7280', '#1aa3b8', '#a3a31a'];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? '' : String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text != null) e.textContent = String(text);
  return e;
}

const usd = (x) => x == null ? '–' : '$' + (Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(3));
const num = (x, d = 0) => x == null ? '–' : Number(x).toLocaleString('en-US', { maximumFractionDigits: d });
const hours = (x) => x == null ? '–' : x === 0 ? '0' : x >= 10 ? x.toFixed(1) : x.toPrecision(3);
const pct = (x) => x == null ? '–' : (x * 100).toFixed(1) + '%';
const when = (t) => t ? t.replace('T', ' ').replace('Z', ' UTC') : '–';

function table(headers, rows) {
  const head = el('tr', {}, ...headers.map((h) => el('th', {}, h)));
  const body = rows.map((r) => el('tr', {}, ...r.map((c) => c instanceof Node ? el('td', {}, c) : el('td', {}, c))));
  return el('div', { class: 'wrap' }, el('table', {}, el('thead', {}, head), el('tbody', {}, ...body)));
}

// Swatches are SVG, not styled elements: the page's Content-Security-Policy allows no inline style.
function legend(names) {
  const swatch = (i) => {
    const g = svg('svg', { width: 10, height: 10, viewBox: '0 0 10 10', class: 'swatch' });
    g.append(svg('rect', { width: 10, height: 10, rx: 2, fill: COLORS[i % COLORS.length] }));
    return g;
  };
  return el('div', { class: 'legend' }, ...names.map((n, i) => el('span', {}, swatch(i), n)));
}

// Stacked bars of cost per time step, one colour per group.
function stackedBars(rows, stepKey, groupKey) {
  const steps = [...new Set(rows.map((r) => r[stepKey]))].sort();
  const totals = new Map();
  for (const r of rows) totals.set(r[groupKey], (totals.get(r[groupKey]) || 0) + r.cost_usd);
  const groups = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a));
  const per = new Map(steps.map((s) => [s, new Map()]));
  for (const r of rows) per.get(r[stepKey]).set(r[groupKey], (per.get(r[stepKey]).get(r[groupKey]) || 0) + r.cost_usd);
  const max = Math.max(1e-12, ...steps.map((s) => [...per.get(s).values()].reduce((a, b) => a + b, 0)));
  const W = 420, H = 170, L = 58, B = 22, T = 8;
  const g = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img' });
  const bw = (W - L - 4) / Math.max(steps.length, 1);
  g.append(svg('line', { x1: L, y1: H - B, x2: W, y2: H - B, stroke: '#98a2b3' }));
  g.append(svg('text', { x: L - 4, y: T + 8, 'text-anchor': 'end' }, usd(max)));
  g.append(svg('text', { x: L - 4, y: H - B, 'text-anchor': 'end' }, '$0'));
  steps.forEach((s, i) => {
    let y = H - B;
    groups.forEach((grp, gi) => {
      const v = per.get(s).get(grp) || 0;
      if (v <= 0) return;
      const h = Math.max(1, (v / max) * (H - B - T));
      y -= h;
      const rect = svg('rect', { x: L + i * bw + 1, y, width: Math.max(1, bw - 2), height: h, fill: COLORS[gi % COLORS.length] });
      rect.append(svg('title', {}, `${s} · ${grp}: ${usd(v)}`));
      g.append(rect);
    });
  });
  if (steps.length) {
    g.append(svg('text', { x: L, y: H - 6 }, when(steps[0])));
    if (steps.length > 1) g.append(svg('text', { x: W, y: H - 6, 'text-anchor': 'end' }, when(steps[steps.length - 1])));
  }
  return [g, legend(groups)];
}

// Lines of a ratio (0..1) over time slices, one per series.
function lines(points, names) {
  const W = 420, H = 150, L = 34, B = 22, T = 8;
  const g = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img' });
  g.append(svg('line', { x1: L, y1: H - B, x2: W, y2: H - B, stroke: '#98a2b3' }));
  g.append(svg('text', { x: L - 4, y: T + 8, 'text-anchor': 'end' }, '100%'));
  g.append(svg('text', { x: L - 4, y: H - B, 'text-anchor': 'end' }, '0%'));
  const n = Math.max(points.length - 1, 1);
  names.forEach((name, i) => {
    const d = points.map((p, j) => {
      const x = L + (j / n) * (W - L - 4);
      const y = H - B - (p.busy_ratio[name] || 0) * (H - B - T);
      return `${j ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)}`;
    }).join(' ');
    const path = svg('path', { d, fill: 'none', stroke: COLORS[i % COLORS.length], 'stroke-width': 2 });
    path.append(svg('title', {}, name));
    g.append(path);
  });
  if (points.length) {
    g.append(svg('text', { x: L, y: H - 6 }, when(points[0].from)));
    g.append(svg('text', { x: W, y: H - 6, 'text-anchor': 'end' }, when(points[points.length - 1].to)));
  }
  return [g, legend(names)];
}

// Horizontal bars splitting one total between two parts.
function split(label, parts) {
  const total = parts.reduce((a, p) => a + p.value, 0);
  const W = 420, H = 26;
  const g = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img' });
  let x = 0;
  parts.forEach((p, i) => {
    const w = total > 0 ? (p.value / total) * W : 0;
    const r = svg('rect', { x, y: 4, width: Math.max(w, 0), height: 18, fill: COLORS[i % COLORS.length] });
    r.append(svg('title', {}, `${p.name}: ${p.text}`));
    g.append(r);
    x += w;
  });
  if (total <= 0) g.append(svg('rect', { x: 0, y: 4, width: W, height: 18, fill: '#eef0f3' }));
  return el('figure', {}, el('figcaption', {}, label), g,
    legend(parts.map((p) => `${p.name} ${p.text} (${total > 0 ? pct(p.value / total) : '–'})`)));
}

function fill(id, source, ...nodes) {
  const s = document.getElementById(id);
  const body = s.querySelector('.body');
  if (body) body.replaceChildren(...nodes);
  s.querySelector('.source').textContent = 'Source: ' + source;
  s.dataset.ready = 'true';
}

function spend(d) {
  const sp = d.ledger.spend;
  const sec = document.getElementById('spend');
  for (const key of ['by_team', 'by_tag', 'by_model']) {
    const part = sp[key];
    const fig = sec.querySelector(`[data-chart="${key}"]`);
    const cap = el('figcaption', {}, `by ${part.dimension}, per ${sp.step}`);
    if (!part.rows.length) fig.replaceChildren(cap, el('p', { class: 'empty' }, 'no requests in this period'));
    else fig.replaceChildren(cap, ...stackedBars(part.rows, sp.step, part.dimension));
  }
  sec.querySelector('.source').textContent = 'Source: ' + ['by_team', 'by_tag', 'by_model'].map((k) => sp[k].source).join('; ');
  sec.dataset.ready = 'true';
}

function budgets(d) {
  const rows = Array.isArray(d.budgets.rows) ? d.budgets.rows : [];
  const lim = (b) => b.limit_usd != null ? usd(Number(b.limit_usd)) : b.limit_tokens != null ? num(b.limit_tokens) + ' tok' : '–';
  const soft = (b) => b.soft_ratio == null ? '–' : b.limit_usd != null ? usd(Number(b.limit_usd) * b.soft_ratio) : num(b.limit_tokens * b.soft_ratio) + ' tok';
  const fc = (b) => {
    const f = b.forecast;
    if (!f.exhausts_at) return el('span', { class: 'forecast-none' }, f.burn_usd_per_hour > 0 || f.burn_tokens_per_hour > 0 ? 'lasts until the reset' : 'no burn: no date');
    return el('span', { class: 'forecast-date' }, when(f.exhausts_at));
  };
  const rate = (b) => el('span', { class: 'rate' }, `${usd(b.forecast.burn_usd_per_hour)}/h, ${num(b.forecast.burn_tokens_per_hour)} tok/h over ${b.forecast.rate_window}`);
  const body = rows.length
    ? table(['team', 'key', 'window', 'spent', 'reserved', 'limit', 'soft limit', 'runs out at', 'burn rate (window)', 'resets'],
      rows.map((b) => [b.team, b.key_id || 'all keys', b.window, usd(Number(b.spent_usd)), usd(Number(b.reserved_usd)), lim(b), soft(b), fc(b), rate(b), when(b.resets_at)]))
    : el('p', { class: 'empty' }, d.budgets.rows.error || 'no team has a budget');
  fill('budgets', d.budgets.source + '; forecast at the burn rate over the window stated', body);
}

function unit(d) {
  const rows = d.ledger.unit_economics.rows.filter((r) => r.inferences > 0 || r.cost_usd > 0);
  const body = rows.length
    ? table(['model', 'backend', 'inferences', 'cost / inference p50', 'p95', 'mean', 'tokens per $', 'cost'],
      rows.map((r) => [r.model, r.backend, num(r.inferences), usd(r.cost_per_inference_p50_usd), usd(r.cost_per_inference_p95_usd), usd(r.cost_per_inference_usd), num(r.tokens_per_usd), usd(r.cost_usd)]))
    : el('p', { class: 'empty' }, 'no inferences in this period');
  fill('unit', d.ledger.unit_economics.source, body);
}

function gpus(d) {
  const eco = d.ledger.gpus.economics || [];
  const now = new Map(d.backends_now.rows.filter((b) => b.gpu).map((b) => [b.name, b]));
  const names = [...new Set([...eco.map((r) => r.backend), ...now.keys()])];
  const nodes = [];
  if (names.length) {
    const fig = el('figure', {}, el('figcaption', {}, 'busy ratio over the period (share of time with a request in flight)'), ...lines(d.ledger.gpus.busy_over_time, eco.map((r) => r.backend)));
    nodes.push(el('div', { class: 'side' }, fig, table(['backend', 'GPU hours paid', 'hours charged', 'paid', 'charged', 'idle cost', 'busy (period)', 'busy now', 'idle now'],
      names.map((n) => {
        const r = eco.find((x) => x.backend === n) || {};
        const live = now.get(n);
        const charged_h = r.paid_usd > 0 ? r.gpu_hours * r.charged_usd / r.paid_usd : null;
        const idle = live && live.gpu.idle;
        return [n, hours(r.gpu_hours), hours(charged_h), usd(r.paid_usd), usd(r.charged_usd), usd(r.idle_cost_usd), pct(r.busy_ratio),
          live ? pct(live.gpu.busy_ratio) : '–', el('span', { class: idle ? 'flag' : 'good', 'data-idle': String(!!idle) }, idle ? 'IDLE' : 'busy')];
      }))));
  } else nodes.push(el('p', { class: 'empty' }, 'no self-hosted backend with a gpu cost in the config'));
  fill('gpus', d.ledger.gpus.source + '; now: ' + d.backends_now.source, ...nodes);
}

function routing(d) {
  const r = d.ledger.routing;
  const parts = (k) => [
    { name: 'owned GPUs', value: k === 'requests' ? r.self_hosted.requests : r.self_hosted.cost_usd, text: k === 'requests' ? num(r.self_hosted.requests) : usd(r.self_hosted.cost_usd) },
    { name: 'commercial APIs', value: k === 'requests' ? r.commercial.requests : r.commercial.cost_usd, text: k === 'requests' ? num(r.commercial.requests) : usd(r.commercial.cost_usd) },
  ];
  const spill = el('div', { class: 'kpis' },
    el('div', { class: 'kpi' }, el('b', {}, num(r.spill.requests)), el('span', {}, 'requests spilled to the cloud')),
    el('div', { class: 'kpi' }, el('b', {}, usd(r.spill.cost_usd)), el('span', {}, 'cost of the spill-over')),
    el('div', { class: 'kpi' }, el('b', {}, num(r.no_backend.requests)), el('span', {}, 'refused before a backend')));
  const rows = r.spill.rows.length ? table(['requested', 'served by', 'requests', 'cost'], r.spill.rows.map((s) => [s.requested_model, s.backend, num(s.requests), usd(s.cost_usd)])) : el('p', { class: 'empty' }, 'no spill-over in this period');
  fill('routing', r.source, el('div', { class: 'side' }, el('div', {}, split('share of requests', parts('requests')), split('share of dollars', parts('usd'))), el('div', {}, spill, rows)));
}

function breakeven(d) {
  const eco = d.ledger.gpus.economics || [];
  const verdicts = new Map((d.ledger.gpus.verdicts || []).map((v) => [v.backend, v.verdict]));
  const body = eco.length
    ? el('div', {}, table(['backend', 'commercial twin', 'twin would cost', 'paid', 'owning saves', 'tokens/hour', 'break-even tokens/hour', 'capacity tokens/hour'],
      eco.map((r) => {
        const c = r.commercial;
        const saves = c && c.owning_saves != null ? el('span', { class: c.owning_saves >= 0 ? 'good' : 'bad' }, pct(c.owning_saves)) : '–';
        return [r.backend, c ? c.serving : 'none', c ? usd(c.cost_usd) : '–', usd(r.paid_usd), saves, num(r.tokens_per_hour), c ? num(c.break_even_tokens_per_hour) : '–', num(r.capacity_tokens_per_hour)];
      })), ...eco.map((r) => el('p', { class: 'note' }, verdicts.get(r.backend) || '')))
    : el('p', { class: 'empty' }, 'no self-hosted backend with a gpu cost in the config');
  fill('breakeven', d.ledger.gpus.source, body);
}

async function load() {
  const form = document.getElementById('period');
  const params = new URLSearchParams();
  params.set('from', form.elements.from.value);
  if (form.elements.tag.value) params.set('tag', form.elements.tag.value);
  const status = document.getElementById('status');
  status.textContent = 'Loading…';
  let d;
  try {
    const resp = await fetch('/admin/console?' + params, { credentials: 'same-origin', headers: { accept: 'application/json' } });
    d = await resp.json();
    if (!resp.ok) throw new Error((d.error && d.error.message) || resp.statusText);
  } catch (e) {
    status.textContent = 'Could not load the figures: ' + e.message;
    status.className = 'note bad';
    return;
  }
  if (!form.elements.tag.value) form.elements.tag.placeholder = d.period.tag;
  status.className = 'note';
  status.textContent = `Period ${when(d.period.from)} – ${when(d.period.to)}${d.period.open_start ? ' (from the ledger\'s first record)' : ''}, generated ${when(d.generated_at)}. Budgets show their current windows.`;
  for (const draw of [spend, budgets, unit, gpus, routing, breakeven]) {
    try { draw(d); } catch (e) { console.error(draw.name, e); }
  }
  document.body.dataset.loaded = 'true';
}

document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('period').addEventListener('submit', (e) => { e.preventDefault(); load(); });
  load();
});
