// The security console. It holds the officer's token in memory only and talks to the admin
// plane's JSON endpoints with it; every value is inserted as text, never as markup.
'use strict';

const state = { token: null, alerts: new Map(), older: 0, volumes: new Map(), firstMinute: 0, feedAbort: null, renderPending: false, unexamined: 0, reloading: false, reloadAgain: false };
const COLOURS = ['#c0392b', '#2471a3', '#1e8449', '#b9770e', '#7d3c98', '#117a65', '#515a5a', '#a04000'];
const MAX_FEED_ROWS = 200;
const $ = (s) => document.querySelector(s);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ''));
  return e;
}

function status(text, error) {
  const s = $('#status');
  s.textContent = text;
  s.className = error ? 'error' : '';
}

async function api(path, options) {
  const opts = options || {};
  const headers = Object.assign({ Authorization: 'Bearer ' + state.token }, opts.headers || {});
  const resp = await fetch(path, Object.assign({}, opts, { headers }));
  if (!resp.ok) {
    let detail = resp.statusText;
    let type = '';
    try { const p = await resp.json(); detail = p.detail || p.title || detail; type = p.type || ''; } catch (_) { /* not JSON */ }
    const err = new Error(resp.status + ': ' + detail);
    err.type = type;
    throw err;
  }
  return resp.json();
}

async function connect(event) {
  event.preventDefault();
  state.token = $('#token').value.trim();
  // Held in this page's memory only: not left in the form, where a browser may offer to save it.
  $('#token').value = '';
  if (state.feedAbort) state.feedAbort.abort();
  try {
    const log = await api('/alerts');
    // Oldest first, as `keep` drops them.
    state.alerts = new Map([...log.alerts].reverse().map((a) => [a.id, a]));
    state.older = log.older_in_breach_log || 0;
    renderAlerts();
    const v = await api('/volumes');
    state.firstMinute = Math.floor(Date.parse(v.first_minute) / 60000);
    state.volumes = new Map(v.principals.map((p) => [p.principal, { role: p.role, counts: p.counts }]));
    renderChart();
    status('Connected. Watching live.');
    follow();
  } catch (e) {
    status('Cannot connect: ' + e.message, true);
  }
}

// The live feed over fetch (EventSource cannot send an Authorization header).
async function follow() {
  const abort = new AbortController();
  state.feedAbort = abort;
  try {
    const resp = await fetch('/events', { headers: { Authorization: 'Bearer ' + state.token }, signal: abort.signal });
    if (resp.status === 401 || resp.status === 403) {
      // The token has ended or was revoked: asking again every two seconds would only pile
      // up refusals in the audit log (and raise alerts about the analyst). Ask for a new one.
      status('The feed refused this token (' + resp.status + '): paste a new one to go on watching.', true);
      return;
    }
    if (!resp.ok) throw new Error(resp.status + ' ' + resp.statusText);
    status('Connected. Watching live.');
    // Alerts come over the feed only while it is open: one raised before it opened (since
    // the list was read, or while it was down) is read from the list again.
    reloadAlerts();
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        onEvent(buf.slice(0, i));
        buf = buf.slice(i + 2);
      }
    }
    status('Feed ended; reconnecting…', true);
  } catch (e) {
    if (abort.signal.aborted) return;
    status('Feed interrupted (' + e.message + '); reconnecting…', true);
  }
  setTimeout(() => { if (state.feedAbort === abort) follow(); }, 2000);
}

function onEvent(chunk) {
  let kind = 'message';
  let data = '';
  for (const line of chunk.split('\n')) {
    if (line.startsWith('event: ')) kind = line.slice(7);
    else if (line.startsWith('data: ')) data += line.slice(6);
  }
  if (!data) return;
  const d = JSON.parse(data);
  if (kind === 'access') onAccess(d);
  else if (kind === 'alert') { keep(d); renderSoon(); }
  else if (kind === 'lagged') {
    status('The feed skipped ' + d.missed + ' events (too busy); the audit log has them all. ' +
      'The alerts are read again.', true);
    // Alerts may have been among them.
    reloadAlerts();
  }
  else if (kind === 'detection_lagged') {
    // Not this page's gap: records no rule examined. Stays on screen until reloaded.
    state.unexamined += d.missed;
    const w = $('#detection');
    w.textContent = 'Breach detection fell behind: ' + state.unexamined + ' audit records were not examined by ' +
      'any rule, so alerts may be missing. Review the audit log for that time (the server log and ' +
      'wardgate_watch_missed_records_total say when).';
    w.hidden = false;
  }
}

function onAccess(d) {
  const row = el('tr', { class: d.decision },
    el('td', {}, d.ts.slice(11, 23)), el('td', {}, d.principal || d.client_addr || '—'), el('td', {}, d.role || ''),
    el('td', {}, d.purpose || ''), el('td', {}, d.dataset || ''), el('td', {}, d.route || d.kind),
    el('td', {}, d.decision), el('td', {}, String(d.records)), el('td', {}, d.reason || ''));
  const feed = $('#feed');
  feed.prepend(row);
  while (feed.rows.length > MAX_FEED_ROWS) feed.deleteRow(-1);
  if (d.principal && d.decision === 'allow' && d.records > 0) {
    const minute = Math.floor(Date.parse(d.ts) / 60000);
    shiftTo(minute);
    const s = state.volumes.get(d.principal) || { role: d.role, counts: new Array(60).fill(0) };
    s.counts[minute - state.firstMinute] += d.records;
    state.volumes.set(d.principal, s);
    renderChart();
  }
}

// Keeps the chart's sixty minutes ending at `minute`.
function shiftTo(minute) {
  const first = minute - 59;
  const by = first - state.firstMinute;
  if (by <= 0) return;
  for (const s of state.volumes.values()) {
    s.counts = s.counts.slice(Math.min(by, 60)).concat(new Array(Math.min(by, 60)).fill(0));
  }
  state.firstMinute = first;
}

function remaining(reportBy) {
  const ms = Date.parse(reportBy) - Date.now();
  if (ms <= 0) return 'OVERDUE';
  const h = Math.floor(ms / 3600000);
  const m = Math.floor((ms % 3600000) / 60000);
  const s = Math.floor((ms % 60000) / 1000);
  return h + 'h ' + String(m).padStart(2, '0') + 'm ' + String(s).padStart(2, '0') + 's';
}

// The alert list as the server holds it, merged into the page's (classifications and
// containments made meanwhile come with it). One read at a time, and asked for again while
// one is under way (a feed skipping events again and again), one more five seconds later:
// each read is an audited request for the whole list.
async function reloadAlerts() {
  if (state.reloading) {
    state.reloadAgain = true;
    return;
  }
  state.reloading = true;
  try {
    const log = await api('/alerts');
    for (const a of [...log.alerts].reverse()) keep(a);
    renderSoon();
  } catch (e) {
    status('Could not read the alerts again (' + e.message + '): reload the page, alerts may be missing.', true);
  } finally {
    state.reloading = false;
  }
  if (state.reloadAgain) {
    state.reloadAgain = false;
    setTimeout(reloadAlerts, 5000);
  }
}

// An alert from the live feed, holding as many as the gateway does (the oldest go, as there).
function keep(a) {
  if (!state.alerts.has(a.id) && state.alerts.size >= 10000) {
    state.alerts.delete(state.alerts.keys().next().value);
    state.older += 1;
  }
  state.alerts.set(a.id, a);
}

// Alerts arriving in a flood are drawn once a frame, not once each.
function renderSoon() {
  if (state.renderPending) return;
  state.renderPending = true;
  requestAnimationFrame(() => { state.renderPending = false; renderAlerts(); });
}

function renderAlerts() {
  const all = [...state.alerts.values()].sort((a, b) => b.detected_at.localeCompare(a.detected_at));
  const open = all.filter((a) => !a.classification);
  const tbody = $('#alerts');
  // What the officer has chosen or typed in each row survives the rows being drawn again.
  const typed = new Map();
  for (const row of tbody.querySelectorAll('tr.alert')) {
    typed.set(row.dataset.id, {
      cls: row.querySelector('select.classify-class').value,
      note: row.querySelector('input.classify-note').value,
    });
  }
  tbody.replaceChildren();
  if (open.length === 0) tbody.append(el('tr', { class: 'empty' }, el('td', { colSpan: 8 }, 'No open alerts.')));
  if (state.older > 0) {
    tbody.append(el('tr', { class: 'empty' }, el('td', { colSpan: 8 }, state.older +
      ' older alerts are not listed (the console holds the newest 10,000): the breach log file has them, ' +
      'and they can still be classified or contained by id through the admin API.')));
  }
  for (const a of open) {
    const cls = el('select', { class: 'classify-class' },
      el('option', { value: 'reportable' }, 'reportable'), el('option', { value: 'near_miss' }, 'near miss'));
    const note = el('input', { class: 'classify-note', placeholder: 'note (required)' });
    const kept = typed.get(a.id);
    if (kept) { cls.value = kept.cls; note.value = kept.note; }
    const classify = el('button', { class: 'classify', type: 'button' }, 'Classify');
    classify.addEventListener('click', () => doClassify(a.id, cls.value, note.value));
    const caller = a.principal && a.principal.subject;
    // `revoked`, or `revoked: ...` (in effect here, not yet shared): either way, do not repeat it.
    const revoked = !!a.containment && a.containment.outcome.startsWith('revoked');
    const revoke = el('button', { class: 'revoke', type: 'button', disabled: !caller || revoked },
      revoked ? 'Tokens revoked' : 'Revoke tokens');
    revoke.addEventListener('click', () => doRevoke(a.id, caller));
    tbody.append(el('tr', { class: 'alert', 'data-id': a.id },
      el('td', {}, a.id), el('td', {}, a.rule), el('td', {}, a.principal ? a.principal.subject + ' (' + a.principal.role + ')' : a.key),
      el('td', {}, a.summary + (a.addresses && a.addresses.length ? ': ' + a.addresses.join(', ') : '')), el('td', {}, (a.evidence.length || (a.evidence_refs || []).length) + ' audit records'),
      el('td', { class: 'deadline', 'data-report-by': a.report_by }, remaining(a.report_by)),
      el('td', {}, cls, note, classify), el('td', {}, revoke)));
  }
  const log = $('#log');
  log.replaceChildren();
  for (const a of all) {
    const c = a.classification;
    log.append(el('tr', { 'data-id': a.id },
      el('td', {}, a.id), el('td', {}, a.detected_at), el('td', {}, a.report_by), el('td', {}, a.rule),
      el('td', {}, a.principal ? a.principal.subject : a.key),
      el('td', {}, a.containment ? a.containment.outcome : ''),
      el('td', { class: c ? 'class-' + c.class : '' }, c ? c.class.replace('_', ' ') : 'open'),
      el('td', {}, c ? c.note : ''), el('td', {}, c ? c.by : '')));
  }
}

async function doClassify(id, cls, note) {
  try {
    const a = await api('/alerts/' + encodeURIComponent(id) + '/classify', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ class: cls, note }),
    });
    keep(a);
    renderAlerts();
    status('Alert ' + id + ' classified as ' + cls.replace('_', ' ') + '.');
  } catch (e) {
    status('Not classified: ' + e.message, true);
  }
}

async function doRevoke(id, caller) {
  // Rows move as alerts arrive: the officer confirms whom the button is for.
  if (!confirm('Revoke every token of ' + caller + ' (alert ' + id + ')?')) return;
  try {
    const a = await api('/alerts/' + encodeURIComponent(id) + '/contain', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ reason: 'revoked from the security console' }),
    });
    keep(a);
    renderAlerts();
    status('Every token of ' + caller + ' so far revoked on every replica.');
  } catch (e) {
    if (e.type === 'urn:wardgate:problem:controls-not-shared') {
      // In effect on this replica (the breach log has it, unless that write failed too):
      // show the alert as it stands, and say not to repeat it.
      try {
        const log = await api('/alerts');
        state.alerts = new Map([...log.alerts].reverse().map((x) => [x.id, x]));
        state.older = log.older_in_breach_log || 0;
        renderAlerts();
      } catch (_) { /* the status below still says what happened */ }
      status('Tokens of ' + caller + ' revoked on this replica; the others learn of it when the shared store is back. Do not revoke them again.', true);
    } else if (e.type === 'urn:wardgate:problem:breach-log-unavailable') {
      status('Every token of ' + caller + ' so far revoked on every replica, but the breach log could not note it on the alert (which still shows it open): do not revoke them again; see the gateway\'s log.', true);
    } else {
      status('Not revoked: ' + e.message, true);
    }
  }
}

function renderChart() {
  const svg = $('#chart');
  const ns = 'http://www.w3.org/2000/svg';
  svg.replaceChildren();
  const series = [...state.volumes.entries()]
    .map(([p, s]) => [p, s, s.counts.reduce((x, y) => x + y, 0)])
    .filter((x) => x[2] > 0).sort((a, b) => b[2] - a[2]).slice(0, COLOURS.length);
  const max = Math.max(1, ...series.flatMap(([, s]) => s.counts));
  const legend = $('#legend');
  legend.replaceChildren();
  series.forEach(([p, s, total], i) => {
    const points = s.counts.map((n, x) => (x * 640 / 59).toFixed(1) + ',' + (195 - n * 185 / max).toFixed(1)).join(' ');
    const line = document.createElementNS(ns, 'polyline');
    line.setAttribute('points', points);
    line.setAttribute('fill', 'none');
    line.setAttribute('stroke', COLOURS[i]);
    line.setAttribute('stroke-width', '2');
    line.setAttribute('data-principal', p);
    svg.append(line);
    const item = el('li', {}, p + ' (' + s.role + '): ' + total + ' records');
    item.style.setProperty('--c', COLOURS[i]);
    legend.append(item);
  });
  const label = document.createElementNS(ns, 'text');
  label.setAttribute('x', '4');
  label.setAttribute('y', '14');
  label.setAttribute('font-size', '11');
  label.textContent = 'peak ' + max + ' records/min';
  svg.append(label);
}

setInterval(() => {
  for (const td of document.querySelectorAll('td.deadline')) {
    const left = remaining(td.dataset.reportBy);
    td.textContent = left;
    td.classList.toggle('overdue', left === 'OVERDUE');
  }
}, 1000);

document.addEventListener('DOMContentLoaded', () => {
  $('#login').addEventListener('submit', connect);
});
