// Drives the system's headless Chromium through the console (scripts/dashboard-browser.sh runs
// it): signs in once with ?key=, waits for the page to draw every panel, checks each panel's
// data, and saves screenshots. Expectations come from the environment:
//   TOLLGATE_EXPECT_TEAMS   comma-separated team names that must appear on the page
// Exit 0 every check passed, 1 a check failed (each failure printed).
'use strict';

const { chromium } = require('playwright-core');
const path = require('path');

async function main() {
  const [base, key, out] = process.argv.slice(2);
  const teams = (process.env.TOLLGATE_EXPECT_TEAMS || '').split(',').filter(Boolean);
  const browser = await chromium.launch({
    executablePath: process.env.TOLLGATE_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // Root in a container has no user namespace for Chromium's sandbox.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const failures = [];
  const check = (ok, what) => { if (!ok) failures.push(what); };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
    const signIn = new URL('/dashboard', base);
    signIn.searchParams.set('key', key);
    const resp = await page.goto(signIn.toString());
    check(resp && resp.ok(), `the page answered ${resp && resp.status()}`);
    check(new URL(page.url()).search === '', `the key stayed in the address: ${page.url()}`);
    await page.waitForSelector('body[data-loaded="true"]', { timeout: 20000 });

    const report = await page.evaluate(() => {
      const panels = {};
      for (const s of document.querySelectorAll('section[data-panel]')) {
        panels[s.dataset.panel] = {
          ready: s.dataset.ready === 'true',
          rects: [...s.querySelectorAll('svg rect')].filter((r) => Number(r.getAttribute('height')) > 0 && Number(r.getAttribute('width')) > 0).length,
          paths: [...s.querySelectorAll('svg path')].filter((p) => (p.getAttribute('d') || '').length > 3).length,
          source: (s.querySelector('.source') || {}).textContent || '',
          text: s.innerText,
        };
      }
      const charts = {};
      for (const f of document.querySelectorAll('#spend figure[data-chart]')) {
        charts[f.dataset.chart] = [...f.querySelectorAll('svg rect')].filter((r) => Number(r.getAttribute('height')) > 0).length;
      }
      return {
        panels,
        charts,
        forecasts: [...document.querySelectorAll('.forecast-date')].map((e) => e.textContent),
        idleFlags: document.querySelectorAll('[data-idle]').length,
        status: document.getElementById('status').textContent,
        html: document.documentElement.outerHTML,
      };
    });

    for (const name of ['spend', 'budgets', 'unit', 'gpus', 'routing', 'breakeven']) {
      const p = report.panels[name];
      check(p && p.ready, `panel ${name} did not draw`);
      check(p && p.source.startsWith('Source: ') && p.source.length > 20, `panel ${name} names no source`);
    }
    for (const [chart, rects] of Object.entries(report.charts)) {
      check(rects > 0, `spend chart ${chart} has no bars`);
    }
    check(Object.keys(report.charts).length === 3, 'three spend charts');
    const spendText = report.panels.spend ? report.panels.spend.text : '';
    for (const t of teams) {
      check(spendText.includes(t), `team ${t} missing from the spend chart`);
      check(report.panels.budgets && report.panels.budgets.text.includes(t), `team ${t} missing from the budgets`);
    }
    check(report.panels.gpus && report.panels.gpus.paths > 0, 'the GPU busy-ratio chart has no line');
    check(report.idleFlags > 0, 'no idle flag on the GPU table');
    check(report.panels.routing && report.panels.routing.rects > 0, 'the routing shares drew nothing');
    check(report.forecasts.some((f) => /^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC$/.test(f)), `no forecast date: ${JSON.stringify(report.forecasts)}`);
    check(report.panels.budgets && /over the (last|window so far)/.test(report.panels.budgets.text), 'the forecast states no rate window');
    check(report.panels.unit && /\$/.test(report.panels.unit.text), 'no cost per inference');
    check(report.panels.breakeven && report.panels.breakeven.text.includes('break-even'), 'no break-even');
    check(/^Period \d{4}-/.test(report.status), `the page states no period: ${report.status}`);
    check(!report.html.includes(key), 'the admin key is in the page');
    check(errors.length === 0, `script errors: ${errors.join('; ')}`);

    await page.screenshot({ path: path.join(out, 'dashboard.png'), fullPage: true });
    for (const name of ['spend', 'budgets', 'gpus', 'routing']) {
      await page.locator(`section[data-panel="${name}"]`).screenshot({ path: path.join(out, `${name}.png`) });
    }
    // The period selector re-draws from the server.
    await page.selectOption('select[name="from"]', '24h');
    await page.click('#period button');
    await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('Period'));
  } finally {
    await browser.close();
  }
  if (failures.length) {
    for (const f of failures) console.error('dashboard check failed: ' + f);
    process.exit(1);
  }
  console.log('dashboard: every panel drew its data; screenshots in ' + out);
}

main().catch((e) => {
  console.error('dashboard check failed: ' + (e && e.stack || e));
  process.exit(1);
});
