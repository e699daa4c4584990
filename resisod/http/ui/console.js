// The resiso web console: the machine, the jobs, a playground and a gallery, fed by the
// gateway's live feed (one daemon monitor shared by all tabs). No framework, no build step:
// the gateway serves this file as it is.
(() => {
  'use strict';

  const $ = (sel) => document.querySelector(sel);
  const KEY = 'resiso.apiKey';
  const LIVE = new Set(['queued', 'running']);

  // ---- DOM helpers: every piece of data goes in as text, never as markup ------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k === 'dataset') Object.assign(node.dataset, v);
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  // replaceChildren, minus the false/null that conditional children leave behind
  const put = (node, ...kids) => node.replaceChildren(
    ...kids.flat().filter((k) => k !== undefined && k !== null && k !== false));
  const show = (node, on) => { node.hidden = !on; };
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // ---- formatting: numbers are monospace in the page, and short ---------------------------
  function fmtMs(ms) {
    if (ms === undefined || ms === null || Number.isNaN(ms)) return '–';
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    const s = Math.round(ms / 1000);
    return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, '0')}s`;
  }
  const fmtMB = (mb) => (mb === undefined || mb === null ? '–' : `${Math.round(mb)} MB`);
  const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : '–');
  const fmtBytes = (n) => (n === undefined || n === null ? '–' :
    n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`);
  const took = (j) => (j.started_at && j.finished_at ? fmtMs((j.finished_at - j.started_at) * 1000) : '–');
  const pill = (state, extra) => el('span', { class: `pill s-${state}${extra ? ' ' + extra : ''}`, text: state });

  // ---- errors: whatever the API says, shown as a sentence ---------------------------------
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function errorOf(res) {
    let body = null;
    try { body = JSON.parse(await res.text()); } catch (_) { /* not JSON: say only the status */ }
    // {"status":"error","error":{code,message}}, OpenAI's {"error":{message,code}},
    // the health check's {"error":"..."} and FastAPI's own {"detail":"..."}
    const e = body && typeof body === 'object' ? body.error ?? body : null;
    if (e && typeof e === 'object' && e.message) return new ApiError(res.status, e.code || '', e.message);
    if (typeof e === 'string') return new ApiError(res.status, '', e);
    if (e && typeof e.detail === 'string') return new ApiError(res.status, '', e.detail);
    return new ApiError(res.status, '', `the gateway answered HTTP ${res.status} ${res.statusText}`.trim());
  }

  function describe(err) {
    if (err instanceof ApiError) {
      return err.code ? `${err.message} (${err.code}, HTTP ${err.status})` : err.message;
    }
    if (err && err.name === 'AbortError') return 'stopped';
    return `the gateway did not answer (${err && err.message ? err.message : err})`;
  }

  let bannerTimer = 0;
  function banner(message, sticky) {
    $('#banner-text').textContent = message;
    show($('#banner'), true);
    clearTimeout(bannerTimer);
    if (!sticky) bannerTimer = setTimeout(() => show($('#banner'), false), 8000);
  }

  function say(node, message) {
    node.textContent = message || '';
    show(node, !!message);
  }

  // ---- the API key: asked for once when a call answers 401, kept for the session ----------
  let keyAsked = null;

  function askKey(refused) {
    if (!keyAsked) {
      keyAsked = new Promise((resolve) => {
        show($('#key-error'), refused);
        show($('#key-dialog'), true);
        $('#key-input').value = '';
        $('#key-input').focus();
        $('#key-form').onsubmit = (ev) => {
          ev.preventDefault();
          sessionStorage.setItem(KEY, $('#key-input').value.trim());
          show($('#key-dialog'), false);
          keyAsked = null;
          resolve();
        };
      });
    }
    return keyAsked;
  }

  async function request(path, opts = {}) {
    for (;;) {
      const key = sessionStorage.getItem(KEY);
      const headers = { ...(opts.headers || {}) };
      if (key) headers.Authorization = `Bearer ${key}`;
      const res = await fetch(path, { ...opts, headers });
      if (res.status !== 401) return res;
      // a call sent before the key was typed retries with it; otherwise ask (again)
      if (sessionStorage.getItem(KEY) === key) await askKey(key !== null);
    }
  }

  async function api(path, opts) {
    const res = await request(path, opts);
    if (!res.ok) throw await errorOf(res);
    return res.json();
  }

  const postJSON = (path, body, extra) => request(path, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body), ...extra,
  });

  // <audio>/<img> cannot send a header: with a key, files come through fetch as blobs
  const blobs = new Map();
  async function mediaSrc(url) {
    if (!sessionStorage.getItem(KEY)) return url;
    if (!blobs.has(url)) {
      const res = await request(url);
      if (!res.ok) throw await errorOf(res);
      blobs.set(url, URL.createObjectURL(await res.blob()));
    }
    return blobs.get(url);
  }

  // server-sent events from a fetch body (EventSource can neither POST nor send a header)
  async function* sse(res) {
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value.replace(/\r\n/g, '\n');
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split('\n').filter((l) => l.startsWith('data:'))
          .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
        if (data) yield data;
      }
    }
  }

  // ---- tabs -------------------------------------------------------------------------------
  const PANELS = ['machine', 'jobs', 'playground', 'gallery'];
  function showPanel(name) {
    if (!PANELS.includes(name)) name = 'machine';
    for (const p of PANELS) {
      $(`#${p}`).classList.toggle('active', p === name);
      document.querySelector(`#tabs a[data-panel="${p}"]`).classList.toggle('active', p === name);
    }
    if (name === 'gallery') loadGallery();
  }
  window.addEventListener('hashchange', () => showPanel(location.hash.slice(1)));

  // ---- the live feed ----------------------------------------------------------------------
  let snap = null;

  function setConn(state, detail) {
    const c = $('#conn');
    c.className = `conn conn-${state}`;
    c.textContent = state;
    c.title = detail || 'live feed';
  }

  async function runFeed() {
    for (;;) {
      try {
        const res = await request('/api/console/feed', { headers: { Accept: 'text/event-stream' } });
        if (!res.ok) throw await errorOf(res);
        for await (const data of sse(res)) {
          const msg = JSON.parse(data);
          if (msg.type === 'status') {
            setConn('live', `${msg.viewers} open view(s)`);
            onStatus(msg);
          } else if (msg.type === 'error') {
            setConn('offline', msg.error.message);
            $('#machine-summary').textContent = `The daemon is not answering: ${msg.error.message}`;
          }
        }
        setConn('offline', 'the feed ended');
      } catch (err) {
        setConn('offline', describe(err));
        if (!snap) $('#machine-summary').textContent = `No live feed: ${describe(err)}`;
      }
      await sleep(2000);
    }
  }

  function onStatus(msg) {
    snap = msg;
    renderMachine();
    refreshPickers();
    renderJobs();
    noticeFinished();
  }

  // ---- machine ----------------------------------------------------------------------------
  function renderMachine() {
    const uptime = fmtMs((snap.uptime_s || 0) * 1000);
    const loop = snap.loop || {};
    put($('#machine-summary'),
      el('span', {}, 'resisod ', el('b', { class: 'num', text: snap.version })),
      el('span', {}, 'pid ', el('b', { class: 'num', text: snap.pid })),
      el('span', {}, 'up ', el('b', { class: 'num', text: uptime })),
      loop.max_iteration_ms !== undefined &&
        el('span', {}, 'longest loop ', el('b', { class: 'num', text: fmtMs(loop.max_iteration_ms) })),
      snap.stopping && pill('stopping'),
    );
    const gpus = snap.gpus || [];
    show($('#gpus'), gpus.length > 0);
    $('#gpus').replaceChildren(...gpus.map((g) => el('span', {},
      `GPU ${g.index} ${g.name} `, el('b', { class: 'num', text: `${fmtMB(g.used_mb)} / ${fmtMB(g.total_mb)}` }))));
    const names = Object.keys(snap.domains || {});
    if (!names.length) {
      $('#domains').replaceChildren(el('p', { class: 'empty', text: 'No domains configured.' }));
      return;
    }
    $('#domains').replaceChildren(...names.map((n) => domainCard(n, snap.domains[n])));
  }

  function stat(label, value) {
    return el('div', { class: 'stat' }, el('span', { class: 'label', text: label }),
      el('span', { class: 'num', text: value }));
  }

  // a batching worker shows its places taken out of its capacity, like `resiso status`
  function workerJobs(w) {
    if (!w.capacity || w.capacity <= 1) return w.job || '';
    const bumped = w.bumped || 0;
    const taken = `${(w.jobs || []).length - bumped}/${w.capacity}`;
    return bumped ? `${taken}, ${bumped} paused` : taken;
  }

  function domainCard(name, d) {
    const q = d.queue || {};
    const vram = d.workers.some((w) => w.vram_mb !== undefined && w.vram_mb !== null);
    const head = ['worker', 'pid', 'state', 'cores', 'class', 'device', 'RSS', ...(vram ? ['VRAM'] : []), 'job'];
    const rows = d.workers.map((w) => el('tr', {},
      el('td', { text: w.name }),
      el('td', { class: 'num', text: w.pid ?? '–' }),
      el('td', {}, pill(w.state)),
      el('td', { class: 'num', text: (w.cpus || []).join(',') || 'all' }),
      el('td', { text: w.sched || '–' }),
      el('td', { text: w.device || '–' }),
      el('td', { class: 'num r', text: fmtMB(w.rss_mb) }),
      vram && el('td', { class: 'num r', text: fmtMB(w.vram_mb) }),
      el('td', { class: 'num', text: workerJobs(w) }),
    ));
    return el('article', { class: `card domain d-${d.state}`, dataset: { domain: name } },
      el('header', {}, el('h2', { text: name }), pill(d.state), d.paused && pill('paused')),
      el('dl', { class: 'kv' },
        el('dt', { text: 'kind' }), el('dd', { text: d.kind }),
        el('dt', { text: 'engine' }), el('dd', { text: d.engine }),
        el('dt', { text: 'model' }), el('dd', { class: 'model', text: d.model || '–', title: d.model }),
        el('dt', { text: 'priority' }), el('dd', { text: d.priority })),
      d.reason && el('p', { class: 'error', text: d.reason }),
      el('div', { class: 'stats' },
        stat('queued realtime', q.realtime ?? 0), stat('queued normal', q.normal ?? 0),
        stat('queued batch', q.batch ?? 0),
        stat('running', d.running), stat('p50', fmtMs(d.p50_ms)), stat('p95', fmtMs(d.p95_ms)),
        stat('preemptions', d.preemptions), stat('paused', d.paused ? 'yes' : 'no'),
        stat('paused for', fmtMs((d.paused_s || 0) * 1000)), stat('ran beside', fmtMs((d.co_running_s || 0) * 1000)),
        stat('done / failed / cancelled', `${d.completed} / ${d.failed} / ${d.cancelled}`)),
      el('table', { class: 'workers' },
        el('thead', {}, el('tr', {}, head.map((h) => el('th', { text: h })))),
        el('tbody', {}, rows)),
    );
  }

  // pickers that follow the configured domains: job filter, chat model, voices
  let pickerKey = '';
  function refreshPickers() {
    const domains = snap.domains || {};
    const key = JSON.stringify(Object.entries(domains).map(([n, d]) => [n, d.models, d.voices]));
    if (key === pickerKey) return;
    pickerKey = key;
    fillSelect($('#filter-domain'), [['', 'all'], ...Object.keys(domains).map((n) => [n, n])]);
    const llms = Object.entries(domains).filter(([, d]) => d.kind === 'llm');
    fillSelect($('#chat-model'), [['', 'default'],
      ...llms.map(([n, d]) => [(d.models && d.models[0]) || n, `${n} · ${d.model}`])]);
    const voice = $('#tts-voice');
    const keep = voice.value;
    voice.replaceChildren(el('option', { value: '', text: 'default' }));
    for (const [n, d] of Object.entries(domains)) {
      if (d.kind !== 'tts') continue;
      voice.append(el('optgroup', { label: `${n}${d.language ? ' (' + d.language + ')' : ''}` },
        (d.voices || []).map((v) => el('option', { value: v, text: v }))));
    }
    voice.value = keep;
  }

  function fillSelect(sel, options) {
    const keep = sel.value;
    sel.replaceChildren(...options.map(([v, t]) => el('option', { value: v, text: t })));
    if (options.some(([v]) => v === keep)) sel.value = keep;
  }

  // ---- jobs -------------------------------------------------------------------------------
  let openJobId = null;    // the job whose details are shown
  let openJobState = null; // its state when they were fetched: a change fetches them again

  function filteredJobs() {
    const dom = $('#filter-domain').value;
    const st = $('#filter-state').value;
    return (snap ? snap.jobs || [] : []).filter((j) => (!dom || j.domain === dom) &&
      (!st || (st === 'live' ? LIVE.has(j.status) : j.status === st)));
  }

  function progressCell(j) {
    if (typeof j.progress === 'number') {
      const label = j.total ? `${j.step ?? 0}/${j.total}` : `${Math.round(j.progress * 100)}%`;
      return el('div', { class: 'progress' }, bar(j.progress), el('span', { class: 'num', text: label }));
    }
    if (j.status === 'running') return el('div', { class: 'bar busy' }, el('span'));
    return '';
  }

  function bar(value) {
    const b = el('div', { class: 'bar', role: 'progressbar', 'aria-valuenow': value, 'data-value': value },
      el('span'));
    b.firstChild.style.width = `${Math.round(Math.min(1, Math.max(0, value)) * 100)}%`;
    return b;
  }

  function eta(j) {
    if (j.status === 'running') return fmtMs(j.estimated_time_remaining_ms);
    if (j.status === 'queued') return fmtMs(j.estimated_time_ms);
    return '';
  }

  // rows are kept per job and only the cells whose content changed are redrawn, so a
  // snapshot never swallows a click on a row or on its cancel button
  const rowCache = new Map(); // task_id -> {tr, sigs}
  const cancelling = new Set();

  function cellSpecs(j) {
    const live = LIVE.has(j.status);
    const queue = j.status === 'queued' && j.position !== undefined ? `#${j.position}` : '';
    const prog = typeof j.progress === 'number' ? `${j.progress}|${j.step}|${j.total}`
      : j.status === 'running' ? 'busy' : '';
    const cancel = live ? (cancelling.has(j.task_id) ? 'cancelling' : 'live') : '';
    // [cell class, what it shows, how to draw it]
    return [
      ['num id', j.task_id, () => j.task_id],
      ['', j.domain, () => j.domain],
      ['state', `${j.status}|${!!j.paused}`, () => [pill(j.status), j.paused && pill('paused')]],
      ['', prog, () => progressCell(j)],
      ['num r', queue, () => queue],
      ['num r', eta(j), () => eta(j)],
      ['num', fmtTime(j.created_at), () => fmtTime(j.created_at)],
      ['num r', took(j), () => took(j)],
      ['', cancel, () => cancel && el('button', { class: 'cancel quiet', type: 'button', dataset: { id: j.task_id },
        disabled: cancel === 'cancelling', text: cancel === 'cancelling' ? 'cancelling…' : 'cancel' })],
    ];
  }

  function jobRow(j) {
    let row = rowCache.get(j.task_id);
    if (!row) {
      row = { tr: el('tr', { dataset: { id: j.task_id, kind: j.kind } }), sigs: [] };
      rowCache.set(j.task_id, row);
    }
    cellSpecs(j).forEach(([cls, sig, draw], i) => {
      const td = row.tr.children[i] || row.tr.appendChild(el('td', { class: cls }));
      if (row.sigs[i] === sig) return;
      row.sigs[i] = sig;
      td.replaceChildren(...[].concat(draw()).filter((k) => k !== null && k !== undefined && k !== false && k !== '')
        .map((k) => (k instanceof Node ? k : String(k))));
    });
    row.tr.dataset.state = j.status;
    row.tr.classList.toggle('open', j.task_id === openJobId);
    return row.tr;
  }

  function renderJobs() {
    const jobs = filteredJobs();
    const live = (snap.jobs || []).filter((j) => LIVE.has(j.status)).length;
    $('#jobs-count').textContent = `${jobs.length} shown · ${live} live`;
    show($('#jobs-empty'), jobs.length === 0);
    $('#jobs-empty').textContent = snap.jobs && snap.jobs.length ? 'No job matches the filter.' : 'No jobs yet.';
    const rows = jobs.map(jobRow);
    const body = $('#jobs-table tbody');
    if (rows.length !== body.children.length || rows.some((r, i) => body.children[i] !== r)) {
      body.replaceChildren(...rows);
    }
    const shown = new Set(jobs.map((j) => j.task_id));
    for (const id of rowCache.keys()) if (!shown.has(id)) rowCache.delete(id);
    if (openJobId) {
      const j = (snap.jobs || []).find((x) => x.task_id === openJobId);
      if (j && j.status !== openJobState) {
        openJobState = j.status; // one fetch per change, not one per snapshot
        openJob(openJobId);
      } else if (j && typeof j.progress === 'number') {
        const b = $('#job-detail .bar');
        if (b) b.firstElementChild.style.width = `${Math.round(j.progress * 100)}%`;
      }
    }
  }

  $('#jobs-table tbody').addEventListener('click', (ev) => {
    const btn = ev.target.closest('button.cancel');
    if (btn) { cancelJob(btn.dataset.id, btn); return; }
    const row = ev.target.closest('tr[data-id]');
    if (row) openJob(row.dataset.id);
  });
  $('#filter-domain').addEventListener('change', () => snap && renderJobs());
  $('#filter-state').addEventListener('change', () => snap && renderJobs());

  async function cancelJob(id, btn) {
    cancelling.add(id);
    if (btn) { btn.disabled = true; btn.textContent = 'cancelling…'; }
    try {
      const r = await api(`/api/jobs/${encodeURIComponent(id)}`, { method: 'DELETE' });
      banner(r.cancelled === false ? `${id} had already ended (${r.status})` : `${id} cancelled`);
    } catch (err) {
      banner(`Could not cancel ${id}: ${describe(err)}`);
      if (btn) { btn.disabled = false; btn.textContent = 'cancel'; }
    } finally {
      cancelling.delete(id);
    }
  }

  async function openJob(id) {
    const box = $('#job-detail');
    if (openJobId !== id) box.replaceChildren(el('p', { class: 'muted', text: `Loading ${id}…` }));
    openJobId = id;
    show(box, true);
    let rec;
    try {
      rec = await api(`/api/jobs/${encodeURIComponent(id)}`);
    } catch (err) {
      openJobState = null;
      box.replaceChildren(closeButton(), el('p', { class: 'error', text: describe(err) }));
      return;
    }
    if (openJobId !== id) return;
    openJobState = rec.status;
    box.replaceChildren(...await jobDetail(rec));
  }

  function closeButton() {
    return el('button', { type: 'button', class: 'close quiet', text: '×', 'aria-label': 'close',
      onclick: () => { openJobId = null; show($('#job-detail'), false); } });
  }

  function kvTable(obj) {
    return el('table', { class: 'kvt' }, Object.entries(obj).map(([k, v]) => el('tr', {},
      el('th', { text: k }),
      el('td', { class: typeof v === 'number' ? 'num' : '' },
        typeof v === 'object' && v !== null ? el('pre', { text: JSON.stringify(v, null, 2) }) : String(v)))));
  }

  async function jobDetail(r) {
    const timings = {
      created: fmtTime(r.created_at), started: fmtTime(r.started_at), finished: fmtTime(r.finished_at),
      waited: r.started_at ? fmtMs((r.started_at - r.created_at) * 1000) : '–',
      ran: took(r),
    };
    for (const k of ['generation_time_ms', 'ttft_ms', 'duration_ms']) if (r[k] !== undefined) timings[k.replace(/_ms$/, '')] = fmtMs(r[k]);
    if (r.tokens_per_s !== undefined) timings['tokens/s'] = Number(r.tokens_per_s).toFixed(1);
    if (r.size_bytes !== undefined) timings.size = fmtBytes(r.size_bytes);
    if (r.attempts > 1) timings.attempts = r.attempts;
    const parts = [
      closeButton(),
      el('h2', { class: 'num', text: r.task_id }),
      el('p', {}, pill(r.status), r.paused && pill('paused'), ` ${r.kind} on ${r.domain}, ${r.priority}`),
    ];
    if (typeof r.progress === 'number' && r.status === 'running') parts.push(bar(r.progress));
    if (LIVE.has(r.status)) {
      parts.push(el('button', { type: 'button', class: 'cancel', text: 'Cancel job',
        onclick: (ev) => cancelJob(r.task_id, ev.target) }));
    }
    parts.push(el('h3', { text: 'Parameters' }), r.params ? kvTable(r.params) : el('p', { class: 'muted', text: 'not recorded' }));
    parts.push(el('h3', { text: 'Timings' }), kvTable(timings));
    parts.push(el('h3', { text: 'Result' }));
    if (r.error) parts.push(el('p', { class: 'error', text: `${r.error.message} (${r.error.code})` }));
    else if (r.status !== 'completed') parts.push(el('p', { class: 'muted', text: `the job is ${r.status}` }));
    else if (r.kind === 'llm') parts.push(el('pre', { class: 'result', text: r.result ?? '' }));
    else if (r.audio_url) parts.push(await mediaEl('audio', r.audio_url));
    else if (r.image_url) parts.push(await mediaEl('img', r.image_url, `${r.width}×${r.height}`));
    else parts.push(kvTable(Object.fromEntries(Object.entries(r).filter(([k]) =>
      !['task_id', 'status', 'domain', 'kind', 'priority', 'params', 'created_at', 'started_at', 'finished_at', 'attempts'].includes(k)))));
    return parts;
  }

  async function mediaEl(tag, url, title) {
    try {
      const src = await mediaSrc(url);
      return tag === 'audio' ? el('audio', { controls: true, src, 'data-url': url })
        : el('img', { src, alt: title || url, title, class: 'result-img', 'data-url': url });
    } catch (err) {
      return el('p', { class: 'error', text: describe(err) });
    }
  }

  // ---- playground: chat -------------------------------------------------------------------
  let chatHistory = [];
  let chatAbort = null;
  const CHAT_TURNS = 8; // messages sent back as context: small models have small windows

  function chatBubble(role, text) {
    const log = $('#chat-log');
    log.querySelector('.empty')?.remove();
    const b = el('div', { class: `msg ${role}` }, el('span', { class: 'who', text: role === 'user' ? 'you' : 'model' }),
      el('span', { class: 'text', text }));
    log.append(b);
    log.scrollTop = log.scrollHeight;
    return b.querySelector('.text');
  }

  $('#chat-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const text = $('#chat-input').value.trim();
    if (!text || chatAbort) return;
    say($('#chat-error'), '');
    $('#chat-input').value = '';
    chatBubble('user', text);
    chatHistory.push({ role: 'user', content: text });
    const out = chatBubble('assistant', '');
    out.parentElement.classList.add('streaming');
    chatAbort = new AbortController();
    show($('#chat-send'), false);
    show($('#chat-stop'), true);
    let reply = '';
    try {
      const body = { model: $('#chat-model').value || 'default', messages: chatHistory.slice(-CHAT_TURNS), stream: true };
      const max = parseInt($('#chat-max').value, 10);
      if (max > 0) body.max_tokens = max;
      const temp = parseFloat($('#chat-temp').value);
      if (!Number.isNaN(temp)) body.temperature = temp;
      const res = await postJSON('/v1/chat/completions', body, { signal: chatAbort.signal });
      if (!res.ok) throw await errorOf(res);
      for await (const data of sse(res)) {
        if (data === '[DONE]') break;
        const msg = JSON.parse(data);
        if (msg.error) throw new ApiError(500, msg.error.code || '', msg.error.message || 'the job failed');
        const piece = msg.choices && msg.choices[0] && msg.choices[0].delta.content;
        if (piece) {
          reply += piece;
          out.textContent = reply;
          $('#chat-log').scrollTop = $('#chat-log').scrollHeight;
        }
      }
      chatHistory.push({ role: 'assistant', content: reply });
    } catch (err) {
      if (err.name !== 'AbortError') say($('#chat-error'), describe(err));
      if (reply) chatHistory.push({ role: 'assistant', content: reply });
      else chatHistory.pop(); // a turn that got no answer is not context for the next one
    } finally {
      out.parentElement.classList.remove('streaming');
      if (!reply) out.textContent = '—';
      chatAbort = null;
      show($('#chat-send'), true);
      show($('#chat-stop'), false);
    }
  });
  $('#chat-input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey) { ev.preventDefault(); $('#chat-form').requestSubmit(); }
  });
  $('#chat-stop').addEventListener('click', () => chatAbort && chatAbort.abort());
  $('#chat-clear').addEventListener('click', () => {
    chatHistory = [];
    $('#chat-log').replaceChildren(el('p', { class: 'empty', text: 'Say something to the LLM domain.' }));
  });

  // ---- playground: speech -----------------------------------------------------------------
  $('#tts-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const btn = $('#tts-send');
    btn.disabled = true;
    say($('#tts-error'), '');
    $('#tts-meta').textContent = 'synthesizing…';
    try {
      const body = { text: $('#tts-text').value };
      if ($('#tts-voice').value) body.voice = $('#tts-voice').value;
      const speed = parseFloat($('#tts-speed').value);
      if (!Number.isNaN(speed)) body.speed = speed;
      const res = await postJSON('/api/tts/synthesize', body);
      if (!res.ok) throw await errorOf(res);
      const r = await res.json();
      const audio = $('#tts-audio');
      audio.dataset.url = r.audio_url;
      audio.src = await mediaSrc(r.audio_url);
      show(audio, true);
      $('#tts-meta').textContent = `${fmtMs(r.duration_ms)} of audio in ${fmtMs(r.generation_time_ms)}` +
        `${r.voice ? ` · ${r.voice}` : ''}${r.domain ? ` on ${r.domain}` : ''}${r.cached ? ' · cached' : ''} · ${r.task_id}`;
    } catch (err) {
      $('#tts-meta').textContent = '';
      say($('#tts-error'), describe(err));
    } finally {
      btn.disabled = false;
    }
  });

  // ---- playground: image ------------------------------------------------------------------
  let imageJob = null;

  function setImageProgress(value) {
    const b = $('#image-progress');
    show(b, true);
    b.dataset.value = value;
    b.setAttribute('aria-valuenow', value);
    b.firstElementChild.style.width = `${Math.round(value * 100)}%`;
  }

  $('#image-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (imageJob) return;
    say($('#image-error'), '');
    show($('#image-result'), false);
    const num = (id) => parseInt($(id).value, 10);
    const body = { prompt: $('#image-prompt').value, width: num('#image-width'), height: num('#image-height'),
      steps: num('#image-steps'), use_turbo: $('#image-turbo').checked };
    if ($('#image-seed').value !== '') body.seed = num('#image-seed');
    for (const k of ['width', 'height', 'steps']) if (Number.isNaN(body[k])) delete body[k];
    $('#image-send').disabled = true;
    try {
      const res = await postJSON('/api/image/generate', body);
      if (!res.ok) throw await errorOf(res);
      const r = await res.json();
      imageJob = r.task_id;
      $('#image-status').textContent = `${r.task_id} queued at #${r.position ?? 0}, about ${fmtMs(r.estimated_time_ms)}`;
      setImageProgress(0);
      show($('#image-cancel'), true);
      await followImage(r.task_id);
    } catch (err) {
      say($('#image-error'), describe(err));
    } finally {
      imageJob = null;
      $('#image-send').disabled = false;
      show($('#image-cancel'), false);
    }
  });
  $('#image-cancel').addEventListener('click', (ev) => imageJob && cancelJob(imageJob, ev.target));

  // polls this one job's progress (a few requests a second, only while it lives)
  async function followImage(id) {
    for (;;) {
      const p = await api(`/api/image/progress/${encodeURIComponent(id)}`);
      if (p.status === 'queued') {
        $('#image-status').textContent = `${id} queued at #${p.position ?? 0}`;
      } else if (p.status === 'processing') {
        setImageProgress(p.progress || 0);
        $('#image-status').textContent = `${id} ${Math.round((p.progress || 0) * 100)}% · ` +
          `${fmtMs(p.estimated_time_remaining_ms)} left`;
      } else if (p.status === 'completed') {
        setImageProgress(1);
        $('#image-status').textContent = `${id} done in ${fmtMs(p.generation_time_ms)} · ` +
          `${p.width}×${p.height} · seed ${p.seed} · ${fmtBytes(p.size_bytes)}`;
        const img = $('#image-result');
        img.dataset.url = p.image_url;
        img.src = await mediaSrc(p.image_url);
        show(img, true);
        return;
      } else {
        $('#image-status').textContent = `${id} ${p.status}`;
        if (p.error) say($('#image-error'), `${p.error.message} (${p.error.code})`);
        return;
      }
      await sleep(200);
    }
  }

  // ---- gallery ----------------------------------------------------------------------------
  let galleryIds = '';
  async function loadGallery() {
    const grid = $('#gallery-grid');
    let items;
    try {
      items = (await api('/api/gallery')).items;
    } catch (err) {
      grid.replaceChildren(el('p', { class: 'error', text: `Could not load the gallery: ${describe(err)}` }));
      return;
    }
    const ids = items.map((i) => i.task_id).join();
    show($('#gallery-empty'), items.length === 0);
    if (ids === galleryIds && grid.children.length) return;
    galleryIds = ids;
    const cards = await Promise.all(items.map(async (i) => {
      const media = i.image_url ? await mediaEl('img', i.image_url, `${i.width}×${i.height}`)
        : await mediaEl('audio', i.audio_url);
      const caption = i.image_url ? `${i.width}×${i.height}` : fmtMs(i.duration_ms);
      return el('figure', { class: `card item ${i.kind}`, dataset: { id: i.task_id } }, media,
        el('figcaption', {}, el('a', { href: '#jobs', class: 'num', text: i.task_id,
          onclick: () => setTimeout(() => openJob(i.task_id)) }),
        el('span', { class: 'muted num', text: ` ${caption} · ${fmtTime(i.finished_at)}` })));
    }));
    grid.replaceChildren(...cards);
  }
  $('#gallery-refresh').addEventListener('click', () => { galleryIds = ''; loadGallery(); });

  // a new finished image or speech refreshes an open gallery
  let finishedSeen = null;
  function noticeFinished() {
    const done = (snap.jobs || []).filter((j) => j.status === 'completed' && (j.kind === 'image' || j.kind === 'tts'))
      .map((j) => j.task_id).join();
    if (finishedSeen !== null && done !== finishedSeen && $('#gallery').classList.contains('active')) loadGallery();
    finishedSeen = done;
  }

  $('#banner-close').addEventListener('click', () => show($('#banner'), false));
  showPanel(location.hash.slice(1));
  runFeed();
})();
