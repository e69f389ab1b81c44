/* The transcoder's web page: a profile and its parameters, files uploaded through
 * tus (/uploads, tus-js-client), each job followed by long-poll, the token's jobs.
 * Plain DOM, no framework; nothing is loaded from any other host. */
'use strict';

(function () {
  const TOKEN_KEY = 'transcoder-token';
  // A dropped link is retried after these delays (ms); while the browser says it is
  // offline the upload waits for the 'online' event instead of spending its retries.
  const RETRY_DELAYS = [0, 1000, 3000, 5000, 10000, 20000];
  const CHUNK_SIZE = 32 * 1024 * 1024;
  const WAIT_SECONDS = 30;
  const ACTIVE = new Set(['queued', 'running']);

  const $ = (id) => document.getElementById(id);
  const profiles = new Map();
  const jobs = new Map(); // id -> job JSON, as last seen
  const polling = new Map(); // id -> AbortController of its long-poll under way
  const uploads = new Set(); // upload entries on the page
  let ready = false;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (value === true) node.setAttribute(key, '');
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function status(text) {
    $('status').textContent = text;
  }

  // --- the token -----------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function authHeaders() {
    const t = token();
    return t ? { Authorization: 'Bearer ' + t } : {};
  }

  class APIError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function errorOf(response) {
    let code = 'http_' + response.status;
    let message = response.status + ' ' + response.statusText;
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code;
        message = body.error.message;
      }
    } catch (_e) {
      // Not JSON: the status line says enough.
    }
    return new APIError(response.status, code, message);
  }

  // Every API call goes through here: the token as a header, never in the URL.
  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = Object.assign({ Accept: 'application/json' }, authHeaders(), opts.headers || {});
    const response = await fetch(path, opts);
    if (response.status === 401) {
      const error = await errorOf(response);
      askToken(error);
      throw error;
    }
    return response;
  }

  async function apiJSON(path, options) {
    const response = await api(path, options);
    if (!response.ok) throw await errorOf(response);
    return response.status === 204 ? null : response.json();
  }

  function askToken(error) {
    ready = false;
    const hadToken = Boolean(token());
    sessionStorage.removeItem(TOKEN_KEY);
    $('token-message').textContent = hadToken || error.code === 'invalid_token'
      ? 'That token is not valid (' + error.message + '). Enter another one.'
      : 'This server needs a token. Enter yours; it is kept for this browser session only.';
    $('token-section').hidden = false;
    $('new-section').hidden = true;
    $('jobs-section').hidden = true;
    status('A token is needed.');
    $('token').focus();
  }

  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const value = $('token').value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $('token').value = '';
    start();
  });

  // --- profiles and their parameters ------------------------------------------------

  function paramField(name, spec) {
    const id = 'param-' + name;
    const hintId = id + '-hint';
    const ranges = [];
    let input;
    if (spec.type === 'choice') {
      input = el('select', { id, name });
      for (const choice of spec.choices) {
        input.append(el('option', { value: choice, selected: choice === spec.default, text: choice }));
      }
    } else if (spec.type === 'bool') {
      input = el('input', { id, name, type: 'checkbox', checked: Boolean(spec.default) });
    } else if (spec.type === 'int' || spec.type === 'float') {
      input = el('input', {
        id, name, type: 'number', inputmode: spec.type === 'int' ? 'numeric' : 'decimal',
        step: spec.type === 'int' ? '1' : 'any', min: spec.minimum, max: spec.maximum,
        value: spec.default, required: true,
      });
      if (spec.minimum !== undefined && spec.maximum !== undefined) {
        ranges.push(spec.minimum + ' to ' + spec.maximum);
      }
    } else {
      input = el('input', {
        id, name, type: 'text', value: spec.default, pattern: spec.pattern,
        maxlength: spec.max_length, spellcheck: 'false', autocapitalize: 'off',
      });
    }
    input.setAttribute('aria-describedby', hintId);
    input.dataset.kind = spec.type;
    const hint = [spec.description, ranges.join(''), 'default ' + spec.default].filter(Boolean).join(' · ');
    const wrapper = el('div', { class: spec.type === 'bool' ? 'field check' : 'field' });
    if (spec.type === 'bool') wrapper.append(input, el('label', { for: id, text: name }));
    else wrapper.append(el('label', { for: id, text: name }), input);
    wrapper.append(el('p', { id: hintId, class: 'hint', text: hint }));
    return wrapper;
  }

  function inputLabel(role) {
    return role === 'file' ? 'Video or audio file' : role.charAt(0).toUpperCase() + role.slice(1) + ' file';
  }

  function fileField(profile, role) {
    const id = 'file-' + role;
    const many = profile.inputs.length === 1;
    const input = el('input', {
      id, name: role, type: 'file', multiple: many,
      accept: 'video/*,audio/*,.mkv,.flv,.avi,.mov,.mp4,.mp3,.webm,.ts',
      'aria-describedby': id + '-hint',
    });
    const needs = (profile.needs && profile.needs[role]) || [];
    const hint = (many ? 'Choose or drop one or more files: each becomes a job.'
      : 'Choose or drop one file; the job starts once every input is uploaded.')
      + (needs.length ? ' It must hold ' + needs.join(' and ') + '.' : '');
    const zone = el('div', { class: 'dropzone', 'data-role': role },
      el('label', { for: id, text: inputLabel(role) }),
      input,
      el('p', { id: id + '-hint', class: 'hint', text: hint }));
    input.addEventListener('change', () => {
      const files = Array.from(input.files || []);
      input.value = '';
      chosen(role, files);
    });
    zone.addEventListener('dragover', (event) => {
      event.preventDefault();
      zone.classList.add('over');
    });
    zone.addEventListener('dragleave', () => zone.classList.remove('over'));
    zone.addEventListener('drop', (event) => {
      event.preventDefault();
      zone.classList.remove('over');
      const files = Array.from((event.dataTransfer && event.dataTransfer.files) || []);
      chosen(role, many ? files : files.slice(0, 1));
    });
    return zone;
  }

  function showProfile() {
    const profile = profiles.get($('profile').value);
    if (!profile) return;
    $('profile-description').textContent = profile.description || '';
    const fields = $('param-fields');
    fields.replaceChildren();
    const names = Object.keys(profile.parameters || {});
    for (const name of names) fields.append(paramField(name, profile.parameters[name]));
    $('params').hidden = names.length === 0;
    const inputs = $('input-fields');
    inputs.replaceChildren();
    for (const role of profile.inputs) inputs.append(fileField(profile, role));
    pending.clear();
  }

  // The chosen profile's parameters, as upload metadata (strings), checked by the browser first.
  function paramValues() {
    const values = {};
    for (const input of $('param-fields').querySelectorAll('input, select')) {
      if (!input.checkValidity()) {
        input.reportValidity();
        throw new Error(input.name + ': ' + input.validationMessage);
      }
      if (input.dataset.kind === 'bool') values[input.name] = input.checked ? 'true' : 'false';
      else if (input.value !== '') values[input.name] = input.value;
    }
    return values;
  }

  // --- uploads ------------------------------------------------------------------------

  const pending = new Map(); // role -> finished upload id, for profiles of several inputs

  function chosen(role, files) {
    $('form-message').textContent = '';
    if (!files.length) return;
    const profile = profiles.get($('profile').value);
    let params;
    try {
      params = paramValues();
    } catch (error) {
      $('form-message').textContent = error.message;
      return;
    }
    for (const file of files) {
      const metadata = { filename: file.name, filetype: file.type || 'application/octet-stream' };
      if (profile.inputs.length === 1) {
        Object.assign(metadata, params, { profile: profile.name });
      } else {
        metadata.input = role;
      }
      startUpload(file, metadata, profile, role, params);
    }
  }

  function formatBytes(n) {
    const units = ['B', 'KB', 'MB', 'GB', 'TB'];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) {
      n /= 1000;
      i += 1;
    }
    return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
  }

  function formatSeconds(s) {
    if (!Number.isFinite(s)) return '';
    s = Math.round(s);
    if (s < 60) return s + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
    return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  }

  function uploadId(url) {
    return url ? url.split('/').pop() : null;
  }

  function startUpload(file, metadata, profile, role, params) {
    const entry = { file, profile, role, params, state: 'starting', samples: [], jobLocation: null };
    const label = file.name + (profile.inputs.length > 1 ? ' (' + role + ')' : '');
    const progress = el('progress', { max: '100', value: '0', 'aria-label': 'Upload of ' + label });
    const detail = el('span', { class: 'detail', text: 'starting…' });
    const buttons = {};
    const button = (name, text, action) => {
      buttons[name] = el('button', { type: 'button', class: name, text, 'aria-label': text + ' the upload of ' + label, onclick: action });
      return buttons[name];
    };
    const item = el('li', { class: 'upload' },
      el('span', { class: 'name', text: label }), progress, detail,
      el('span', { class: 'buttons' },
        button('pause', 'Pause', () => { upload.abort(); setState('paused'); }),
        button('resume', 'Resume', () => { setState('uploading'); upload.start(); }),
        button('cancel', 'Cancel', () => {
          setState('cancelled');
          upload.abort(true).catch(() => {});
        }),
        button('retry', 'Retry', () => { setState('uploading'); upload.start(); })));
    entry.item = item;
    uploads.add(entry);
    $('uploads-heading').hidden = false;
    $('uploads').prepend(item);

    function setState(state, text) {
      entry.state = state;
      item.dataset.state = state;
      const focused = Object.values(buttons).find((b) => b === document.activeElement);
      buttons.pause.hidden = state !== 'uploading';
      buttons.resume.hidden = state !== 'paused';
      buttons.cancel.hidden = !['uploading', 'paused', 'failed', 'offline'].includes(state);
      buttons.retry.hidden = state !== 'failed';
      // A keyboard user who pressed Pause lands on Resume (and back), not at the page's top.
      if (focused && focused.hidden) {
        const next = Object.values(buttons).find((b) => !b.hidden);
        if (next) next.focus();
      }
      if (text) detail.textContent = text;
      else if (state === 'paused') detail.textContent = 'paused';
      else if (state === 'cancelled') detail.textContent = 'cancelled';
    }

    const upload = new tus.Upload(file, {
      endpoint: '/uploads',
      chunkSize: CHUNK_SIZE,
      retryDelays: RETRY_DELAYS,
      metadata,
      // Per request, not once at the start: after a rejected token the user enters a new
      // one, and Retry/Resume must send that one.
      onBeforeRequest(req) {
        const value = authHeaders().Authorization;
        if (value) req.setHeader('Authorization', value);
      },
      removeFingerprintOnSuccess: true,
      // As tus-js-client's own rule, but also while offline: the 'online' event restarts it.
      onShouldRetry(err) {
        const code = err.originalResponse ? err.originalResponse.getStatus() : 0;
        return navigator.onLine && (code < 400 || code >= 500 || code === 409 || code === 423);
      },
      onAfterResponse(_req, res) {
        const where = res.getHeader('Job-Location');
        if (where) entry.jobLocation = where;
      },
      onProgress(sent, total) {
        const now = performance.now();
        entry.samples.push([now, sent]);
        while (entry.samples.length > 2 && now - entry.samples[0][0] > 5000) entry.samples.shift();
        const [t0, b0] = entry.samples[0];
        const speed = now > t0 ? ((sent - b0) * 1000) / (now - t0) : 0;
        progress.value = total ? (100 * sent) / total : 0;
        const parts = [formatBytes(sent) + ' of ' + formatBytes(total)];
        if (speed > 0) {
          parts.push(formatBytes(speed) + '/s');
          parts.push(formatSeconds((total - sent) / speed) + ' left');
        }
        if (entry.state === 'uploading') detail.textContent = parts.join(' · ');
      },
      onSuccess(payload) {
        progress.value = 100;
        const where = entry.jobLocation || (payload && payload.lastResponse && payload.lastResponse.getHeader('Job-Location'));
        setState('done', 'uploaded');
        if (profile.inputs.length === 1) {
          if (where) followNewJob(where.split('/').pop(), detail);
        } else {
          inputUploaded(entry, uploadId(upload.url), detail);
        }
        refreshResumable();
      },
      onError(err) {
        if (entry.state === 'cancelled' || entry.state === 'paused') return;
        if (!navigator.onLine) {
          setState('offline', 'offline: it resumes when the network is back');
          return;
        }
        const res = err.originalResponse;
        // Without an answer tus-js-client's message is a dump of its request: say what happened.
        let text = 'the server cannot be reached; Retry once it is back';
        if (res) {
          text = err.message;
          try {
            const body = JSON.parse(res.getBody());
            if (body.error) text = body.error.message;
          } catch (_e) {
            text = 'the server answered ' + res.getStatus();
          }
          if (res.getStatus() === 401) askToken(new APIError(401, 'invalid_token', text));
        }
        setState('failed', 'failed: ' + text);
      },
    });
    entry.upload = upload;
    entry.setState = setState;
    setState('uploading', 'starting…');
    // tus-js-client knows a file by its name, size and date alone: an earlier upload of it
    // is resumed only if it was for the same job (profile, parameters, input) and is not
    // going on in this page (the same file chosen again, for another job).
    upload.findPreviousUploads().then((previous) => {
      const busy = new Set(Array.from(uploads).filter((u) => u !== entry && u.upload && u.upload.url).map((u) => u.upload.url));
      const same = previous.find((p) => !busy.has(p.uploadUrl) && sameMetadata(p.metadata || {}, metadata));
      if (same) {
        upload.resumeFromPreviousUpload(same);
        detail.textContent = 'resuming…';
      }
      upload.start();
    });
  }

  function sameMetadata(a, b) {
    const keys = Object.keys(b);
    return Object.keys(a).length === keys.length && keys.every((key) => a[key] === b[key]);
  }

  // Offline: a request under way would hang on a dead connection until TCP gives up, so
  // each upload is stopped now (the server keeps what arrived) and waits for 'online'.
  window.addEventListener('offline', () => {
    for (const entry of uploads) {
      if (entry.state === 'uploading') {
        entry.upload.abort();
        entry.setState('offline', 'offline: it resumes when the network is back');
      }
    }
  });

  // Back online: every upload the drop stopped goes on from the server's offset (a HEAD first).
  window.addEventListener('online', () => {
    for (const entry of uploads) {
      if (entry.state === 'offline') {
        entry.setState('uploading', 'resuming…');
        entry.upload.start();
      }
    }
  });

  async function inputUploaded(entry, id, detail) {
    pending.set(entry.role, id);
    const profile = entry.profile;
    const missing = profile.inputs.filter((role) => !pending.has(role));
    if (missing.length) {
      detail.textContent = 'uploaded; now choose the ' + missing.join(' and ') + ' file';
      return;
    }
    // The job from the finished uploads: named in the query, no body (docs/api.md).
    const query = new URLSearchParams(Object.assign({ profile: profile.name }, entry.params));
    for (const role of profile.inputs) query.set('upload.' + role, pending.get(role));
    pending.clear();
    try {
      const job = await apiJSON('/jobs?' + query, { method: 'POST' });
      followNewJob(job.id, detail);
      upsertJob(job);
    } catch (error) {
      detail.textContent = 'the job was refused: ' + error.message;
    }
  }

  function followNewJob(id, detail) {
    detail.textContent = 'uploaded: job ' + id.slice(0, 8) + ' below';
    status('Upload finished; the job is in the list.');
    if (!jobs.has(id)) {
      apiJSON('/jobs/' + id).then(upsertJob, () => {});
    }
  }

  // Uploads the browser remembers from before a reload (tus-js-client's localStorage).
  async function refreshResumable() {
    const storage = tus.defaultOptions.urlStorage;
    if (!storage || !storage.findAllUploads) return;
    const previous = await storage.findAllUploads();
    const list = $('resumable-list');
    list.replaceChildren();
    const active = new Set(Array.from(uploads).filter((u) => u.state !== 'cancelled').map((u) => u.upload.url));
    for (const p of previous) {
      if (active.has(p.uploadUrl)) continue;
      const meta = p.metadata || {};
      const what = (meta.filename || 'a file') + ' (' + formatBytes(p.size || 0) + (meta.profile ? ', ' + meta.profile : '')
        + (meta.input ? ', ' + meta.input : '') + ')';
      list.append(el('li', {},
        el('span', { text: what + ', started ' + new Date(p.creationTime).toLocaleString() + ' ' }),
        el('button', {
          type: 'button', text: 'Forget', 'aria-label': 'Forget the unfinished upload of ' + (meta.filename || 'a file'),
          onclick: async () => {
            await storage.removeUpload(p.urlStorageKey);
            fetch(p.uploadUrl, { method: 'DELETE', headers: Object.assign({ 'Tus-Resumable': '1.0.0' }, authHeaders()) }).catch(() => {});
            refreshResumable();
          },
        })));
    }
    $('resumable').hidden = list.children.length === 0;
  }

  // --- jobs ---------------------------------------------------------------------------------

  function jobFiles(job) {
    return (job.inputs || []).map((i) => i.filename || i.name).join(' + ') || job.id.slice(0, 8);
  }

  // The file name of a Content-Disposition: the UTF-8 filename* (RFC 6266/5987) first, the
  // ASCII filename="..." only as the fallback it is meant to be.
  function dispositionName(disposition) {
    const star = /filename\*\s*=\s*UTF-8'[^']*'([^;\s]+)/i.exec(disposition);
    if (star) {
      try {
        return decodeURIComponent(star[1]);
      } catch (_error) {
        // A malformed percent-encoding: fall through to the ASCII name.
      }
    }
    const plain = /filename\s*=\s*"([^"]*)"/i.exec(disposition);
    return plain ? plain[1] : null;
  }

  // A link to a job's file: a plain download without a token; with one, fetched with the
  // header and handed over as a blob, since a link cannot carry it (and it never goes in a URL).
  function downloadLink(url, text, label) {
    const a = el('a', { href: url, text, 'aria-label': label, download: '' });
    a.addEventListener('click', async (event) => {
      if (!token()) return;
      event.preventDefault();
      try {
        const response = await api(url);
        if (!response.ok) throw await errorOf(response);
        const disposition = response.headers.get('Content-Disposition') || '';
        const blob = await response.blob();
        const object = URL.createObjectURL(blob);
        const tmp = el('a', { href: object, download: dispositionName(disposition) || url.split('/').pop() });
        document.body.append(tmp);
        tmp.click();
        tmp.remove();
        setTimeout(() => URL.revokeObjectURL(object), 60000);
      } catch (error) {
        status('Download failed: ' + error.message);
      }
    });
    return a;
  }

  function renderJob(job) {
    const name = jobFiles(job);
    const created = new Date(job.created_at);
    const li = el('li', { class: 'job', id: 'job-' + job.id, 'data-state': job.state, 'data-id': job.id });
    li.append(el('h3', { class: 'name', text: name }));
    const facts = el('dl', {},
      el('dt', { text: 'Profile' }), el('dd', { class: 'profile', text: job.profile }),
      el('dt', { text: 'State' }), el('dd', { class: 'state', text: job.state }),
      el('dt', { text: 'Progress' }),
      el('dd', {},
        el('progress', { max: '100', value: String(job.progress || 0), 'aria-label': 'Transcode of ' + name }),
        ' ', el('span', { class: 'percent', text: (job.progress || 0).toFixed(0) + ' %' })),
      el('dt', { text: 'Created' }),
      el('dd', {}, el('time', { datetime: job.created_at, text: created.toLocaleString() })));
    li.append(facts);
    if (job.state === 'succeeded') {
      const links = el('p', { class: 'results' });
      links.append(downloadLink(job.url + '/result', 'Download the result', 'Download the result of ' + name));
      const outputs = job.outputs || [];
      if (outputs.length > 1) {
        for (const output of outputs) {
          links.append(' ', downloadLink(output.url, output.name, output.name + ' of ' + name));
        }
      }
      li.append(links);
    }
    if (job.state === 'failed' && job.error) {
      li.append(el('p', { class: 'error', role: 'alert', text: 'Failed: ' + job.error.message }));
    }
    if (!ACTIVE.has(job.state) && job.state !== 'cancelled') {
      const pre = el('pre', { class: 'log', tabindex: '0' });
      const details = el('details', {}, el('summary', { text: 'Encoder log' }), pre);
      details.addEventListener('toggle', async () => {
        if (!details.open || pre.textContent) return;
        try {
          const response = await api(job.url + '/log?tail=200');
          pre.textContent = response.ok ? (await response.text()) || '(empty)' : (await errorOf(response)).message;
        } catch (error) {
          pre.textContent = error.message;
        }
      });
      li.append(details);
    }
    const active = ACTIVE.has(job.state);
    li.append(el('button', {
      type: 'button', class: 'cancel', text: active ? 'Cancel' : 'Delete',
      'aria-label': (active ? 'Cancel the job ' : 'Delete the job ') + name,
      onclick: () => removeJob(job),
    }));
    return li;
  }

  function upsertJob(job) {
    jobs.set(job.id, job);
    const list = $('jobs');
    const fresh = renderJob(job);
    const old = document.getElementById('job-' + job.id);
    // Keep the keyboard where it was when a job's card is drawn again.
    // classList, not className: an element without a class (or an SVG one, whose className is
    // no string) must not make the selector below throw.
    const focused = old && old.contains(document.activeElement) ? document.activeElement.classList[0] : undefined;
    if (old) {
      old.replaceWith(fresh);
    } else {
      // Newest first, by creation time.
      const after = Array.from(list.children).find((li) => jobs.get(li.dataset.id).created_at < job.created_at);
      list.insertBefore(fresh, after || null);
    }
    if (focused) {
      const again = fresh.querySelector('.' + CSS.escape(focused));
      if (again) again.focus();
    }
    $('jobs-empty').hidden = jobs.size > 0;
    if (ACTIVE.has(job.state)) follow(job.id);
  }

  // One long-poll per unfinished job: the server answers when its state or progress moves.
  async function follow(id) {
    if (polling.has(id)) return;
    const stop = new AbortController();
    polling.set(id, stop);
    try {
      for (;;) {
        let job;
        try {
          job = await apiJSON('/jobs/' + id + '?wait=' + WAIT_SECONDS, { signal: stop.signal });
        } catch (error) {
          if (stop.signal.aborted) return;
          if (error.status === 404) {
            forget(id);
            return;
          }
          if (error.status === 401) return;
          await new Promise((resolve) => setTimeout(resolve, 2000));
          continue;
        }
        if (!jobs.has(id)) return;
        upsertJob(job);
        if (!ACTIVE.has(job.state)) return;
      }
    } finally {
      if (polling.get(id) === stop) polling.delete(id);
    }
  }

  function forget(id) {
    jobs.delete(id);
    const li = document.getElementById('job-' + id);
    if (li) li.remove();
    $('jobs-empty').hidden = jobs.size > 0;
  }

  async function removeJob(job) {
    // Its long-poll would answer 404 once the job is gone: stopped first.
    const poll = polling.get(job.id);
    if (poll) poll.abort();
    try {
      await apiJSON(job.url, { method: 'DELETE' });
      forget(job.id);
      status((ACTIVE.has(job.state) ? 'Cancelled ' : 'Deleted ') + jobFiles(job) + '.');
      $('refresh').focus();
    } catch (error) {
      status('Could not remove the job: ' + error.message);
      if (ACTIVE.has(job.state)) follow(job.id);
    }
  }

  async function loadJobs() {
    const page = await apiJSON('/jobs?limit=50');
    const seen = new Set(page.jobs.map((j) => j.id));
    for (const id of Array.from(jobs.keys())) if (!seen.has(id)) forget(id);
    for (const job of page.jobs) upsertJob(job);
    $('jobs-empty').hidden = jobs.size > 0;
  }

  $('refresh').addEventListener('click', () => loadJobs().catch((e) => status(e.message)));

  // --- start ------------------------------------------------------------------------------------

  async function start() {
    status('Loading…');
    let list;
    try {
      list = await apiJSON('/profiles');
    } catch (error) {
      if (error.status !== 401) status('Could not load the profiles: ' + error.message);
      return;
    }
    ready = true;
    $('token-section').hidden = true;
    const select = $('profile');
    const current = select.value;
    select.replaceChildren();
    profiles.clear();
    for (const profile of list.profiles) {
      profiles.set(profile.name, profile);
      select.append(el('option', { value: profile.name, text: profile.name }));
    }
    if (profiles.has(current)) select.value = current;
    showProfile();
    $('new-section').hidden = false;
    $('jobs-section').hidden = false;
    try {
      await loadJobs();
    } catch (error) {
      if (error.status !== 401) status('Could not load the jobs: ' + error.message);
      return;
    }
    await refreshResumable();
    if (ready) status('Ready.');
  }

  $('profile').addEventListener('change', showProfile);
  start();
}());
