// GoldenHour board pages: shared code (server clock, live feed, formatting, ECG strips, alarm tones).
// Rules kept everywhere:
// * Data-derived text only through textContent (FF-16); no HTML parsing of any data.
// * Time: the server's clock, never the page's. Every event carries server_time; between events the page advances
//   it with performance.now() (monotonic). Ages come from the server (age_s as of server_time), so a board PC whose
//   clock is minutes off (or a headless browser running on virtual time) shows the same ages as the server.
"use strict";

window.GH = (function () {
  const PRIO_RANK = { high: 0, medium: 1, low: 2 };
  const PRIO_TEXT = { high: "HIGH !!!", medium: "MEDIUM !!", low: "LOW !" };
  const CASE_TEXT = { stemi: "STEMI", stroke: "Stroke", trauma: "Trauma", medical: "Medical" };
  const DEPT_TEXT = {
    ed: "ED", cath_lab: "Cath lab", stroke_team: "Stroke team", ct: "CT", trauma_team: "Trauma team",
    resus_room: "Resus room",
  };
  const STATUS_TEXT = {
    available: "Available", assigned: "Assigned", en_route: "En route", on_scene: "On scene",
    patient_contact: "With patient", transporting: "Transporting", at_hospital: "At hospital",
    handed_over: "Handed over", back_in_service: "Back in service",
  };
  const LEVEL_TEXT = { primary: "primary", backup: "backup", supervisor: "supervisor" };

  // --- server clock ----------------------------------------------------------------------------------------
  let anchorServerMs = null;
  let anchorPerf = 0;

  function parseT(iso) {
    if (!iso) return null;
    const t = Date.parse(iso);
    return Number.isNaN(t) ? null : t;
  }

  // Take a server_time: the estimate only moves forward (an event that waited in a queue carries an older time).
  function syncServer(iso) {
    const t = parseT(iso);
    if (t === null) return;
    const est = serverNow();
    if (est === null || t > est) {
      anchorServerMs = t;
      anchorPerf = performance.now();
    }
  }

  function serverNow() {
    return anchorServerMs === null ? null : anchorServerMs + (performance.now() - anchorPerf);
  }

  // A server-side age (seconds, as of the event's server_time) turned into a reference instant on the server clock.
  function refOf(ageS, serverTimeIso) {
    const t = parseT(serverTimeIso);
    if (t === null || ageS === null || ageS === undefined) return null;
    return t - ageS * 1000;
  }

  function ageSince(refMs) {
    const now = serverNow();
    if (refMs === null || now === null) return null;
    return Math.max(0, (now - refMs) / 1000);
  }

  // --- formatting --------------------------------------------------------------------------------------------
  // A changed text goes into the element's one text node (a character-data change: the browser re-lays out that text
  // only) rather than replacing its children (a node removed and a node inserted: style and layout of both).
  // Empty text still empties the element, for :empty rules.
  const setText = (el, text) => {
    if (!el) return;
    const t = el.firstChild;
    if (text !== "" && t !== null && t.nodeType === Node.TEXT_NODE && t === el.lastChild) {
      if (t.data !== text) t.data = text;
    } else if (el.textContent !== text) {
      el.textContent = text;
    }
  };

  function fmtAge(s) {
    if (s === null || s === undefined) return "";
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    return Math.floor(s / 3600) + " h ago";
  }

  function fmtClock(ms, withSeconds) {
    if (ms === null || ms === undefined) return "--:--";
    const opts = withSeconds ? { hour: "2-digit", minute: "2-digit", second: "2-digit" } : { hour: "2-digit", minute: "2-digit" };
    return new Date(ms).toLocaleTimeString([], opts);
  }

  function fmtCountdown(s) {
    const neg = s < 0;
    s = Math.abs(Math.round(s));
    const m = Math.floor(s / 60), r = s % 60;
    return (neg ? "-" : "") + m + ":" + String(r).padStart(2, "0");
  }

  function fmt(v, digits) { return v === null || v === undefined ? "--" : Number(v).toFixed(digits || 0); }

  function ageBand(age) {
    if (age === null || age === undefined) return "age ?";
    if (age < 1) return "<1 y";
    if (age < 18) return "child " + age + " y";
    const lo = Math.floor(age / 10) * 10;
    return lo + "-" + (lo + 9) + " y";
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  // --- session -----------------------------------------------------------------------------------------------
  // The access token lives in an HttpOnly cookie this script cannot read. It asks the server when the token expires
  // (/api/auth/me), refreshes it two minutes before (POST /api/auth/refresh rotates both cookies), and goes to the
  // sign-in page when the session has ended. The event stream closes itself when its token expires and reconnects
  // with the refreshed cookie.
  const session = { expiresAt: null, timer: null };
  function toLogin() {
    location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
  }
  // Every tab of this board shares the cookies, and a refresh token presented twice revokes the whole session
  // (reuse detection): tabs take turns (Web Locks), and a tab whose turn comes after another tab's refresh finds a
  // fresh token through /me and does not present the rotated one.
  const FRESH_MS = 180000;
  async function refreshSession() {
    const turn = () => refreshOnce();
    try {
      if (navigator.locks) await navigator.locks.request("goldenhour-board-session", turn);
      else await turn();
    } catch (e) { scheduleRetry(); }
  }
  async function refreshOnce() {
    try {
      const me = await fetch("/api/auth/me", { credentials: "same-origin" });
      if (me.ok) {
        const body = await me.json();
        if (Date.parse(body.expires_at) - Date.now() > FRESH_MS) { scheduleRefresh(body.expires_at); return; }
      }
      const res = await fetch("/api/auth/refresh", { method: "POST", credentials: "same-origin" });
      if (res.status === 401) {
        // another tab may have rotated the cookie a moment ago: believe the server's /me before leaving
        const me = await fetch("/api/auth/me", { credentials: "same-origin" });
        if (!me.ok) { toLogin(); return; }
        scheduleRefresh((await me.json()).expires_at);
        return;
      }
      if (res.ok) scheduleRefresh((await res.json()).expires_at);
      else scheduleRetry();
    } catch (e) { scheduleRetry(); }
  }
  function scheduleRetry() {
    clearTimeout(session.timer);
    session.timer = setTimeout(refreshSession, 15000);
  }
  function scheduleRefresh(expiresIso) {
    session.expiresAt = Date.parse(expiresIso);
    const inMs = Math.max(5000, session.expiresAt - Date.now() - 120000 + Math.random() * 20000);
    clearTimeout(session.timer);
    session.timer = setTimeout(refreshSession, inMs);
  }
  async function checkSession() {
    try {
      const res = await fetch("/api/auth/me", { credentials: "same-origin" });
      if (res.status === 401) { await refreshSession(); return; }
      if (res.ok) scheduleRefresh((await res.json()).expires_at);
    } catch (e) { /* offline: the feed's watchdog keeps trying */ }
  }
  checkSession();

  // --- live feed ---------------------------------------------------------------------------------------------
  // EventSource with a watchdog: the server sends a "tick" when idle, so silence longer than stallMs means the link
  // is dead even if the socket looks open; the page then reconnects and gets a full snapshot (resync).
  // rawHandlers (optional): {eventName: fn(dataString)} take those events undecoded (the board decodes the ECG of
  // strips on screen only); every other event is decoded here and given to handlers[name].
  function connectFeed(url, handlers, onLink, stallMs, rawHandlers) {
    let source = null;
    let lastPerf = performance.now();
    let state = "connecting";
    const setState = (s) => { if (s !== state) { state = s; onLink(s); } };
    function open() {
      if (source) source.close();
      source = new EventSource(url);
      lastPerf = performance.now();
      source.onopen = () => { lastPerf = performance.now(); };
      source.onerror = () => { setState("reconnecting"); checkSession(); };
      Object.keys(handlers).forEach((name) => {
        const raw = rawHandlers && rawHandlers[name];
        source.addEventListener(name, (msg) => {
          lastPerf = performance.now();
          if (raw) { raw(msg.data); return; }
          let data;
          try { data = JSON.parse(msg.data); } catch (e) { return; }
          if (data && data.server_time) syncServer(data.server_time);
          if (name === "snapshot" || name === "detail") setState("live");
          handlers[name](data);
        });
      });
    }
    open();
    setInterval(() => {
      if (performance.now() - lastPerf > stallMs) {
        setState("stalled");
        open();
      }
    }, 1000);
    return { state: () => state, reconnect: open };
  }

  function renderLink(linkEl, state) {
    const text = {
      live: "LIVE", connecting: "CONNECTING", reconnecting: "RECONNECTING - data may be old",
      stalled: "NO DATA FROM SERVER - reconnecting", gone: "NOT INBOUND",
    }[state] || state;
    linkEl.className = "link " + (state === "live" ? "link-up" : "link-down");
    setText(linkEl, text);
  }

  // --- acknowledgement ---------------------------------------------------------------------------------------
  async function postAck(hospital, alertId, department, byRole) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), 8000);
    try {
      const body = { hospital_id: hospital, by_role: byRole || "ed_staff" };
      if (department) body.department = department;
      const res = await fetch("/api/alerts/" + encodeURIComponent(alertId) + "/ack", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: ctrl.signal,
      });
      if (!res.ok) throw new Error("HTTP " + res.status);
      return await res.json();
    } finally {
      clearTimeout(timer);
    }
  }

  // The activation rows of an alert: one per department with its state, escalation count-down and own button.
  // rowsEl: a <ul>; returns nothing; buttons call onAck(department).
  function renderActivations(rowsEl, alert, serverTimeIso, onAck) {
    const acts = (alert && alert.activations) || [];
    const want = acts.map((a) => a.department).join(",");
    if (rowsEl.dataset.depts !== want) {
      rowsEl.replaceChildren();
      acts.forEach((a) => {
        const li = el("li", "act");
        li.dataset.department = a.department;
        li.appendChild(el("span", "act-name", DEPT_TEXT[a.department] || a.department));
        li.appendChild(el("span", "act-state"));
        li.appendChild(el("span", "act-clock"));
        const b = el("button", "ack ack-dept", "Ack");
        b.type = "button";
        b.addEventListener("click", (ev) => { ev.stopPropagation(); onAck(li.dataset.department, b); });
        li.appendChild(b);
        rowsEl.appendChild(li);
      });
      rowsEl.dataset.depts = want;
    }
    acts.forEach((a, i) => {
      const li = rowsEl.children[i];
      li.dataset.state = a.state;
      li._escRef = a.escalate_in_s === null || a.escalate_in_s === undefined ? null : parseT(serverTimeIso) + a.escalate_in_s * 1000;
      li.className = "act act-" + a.state + (a.confirmed === false ? " unconfirmed" : "");
      const level = LEVEL_TEXT[a.level] || a.level;
      let text;
      if (a.state === "acknowledged") {
        const at = parseT(a.acknowledged_at);
        text = "ACK " + (at ? fmtClock(at) : "") + (a.acknowledged_by ? " by " + a.acknowledged_by : "") +
          (a.confirmed === false ? " (sending to dispatch)" : "");
      } else if (a.state === "escalated") {
        text = "ESCALATED to " + level;
      } else if (a.state === "cancelled") {
        text = "cancelled";
      } else {
        text = "PAGED " + level;
      }
      setText(li.querySelector(".act-state"), text);
      li.querySelector("button").classList.toggle("hidden", a.state === "acknowledged" || a.state === "cancelled");
    });
    tickActivations(rowsEl);
  }

  // Live count-down to escalate_at, on the server's clock.
  function tickActivations(rowsEl) {
    const now = serverNow();
    Array.from(rowsEl.children).forEach((li) => {
      const clock = li.querySelector(".act-clock");
      if (li._escRef === null || li._escRef === undefined || now === null) { setText(clock, ""); return; }
      const left = (li._escRef - now) / 1000;
      const next = li.dataset.state === "escalated" ? "next escalation" : "escalates";
      setText(clock, left >= 0 ? next + " in " + fmtCountdown(left) : next + " overdue " + fmtCountdown(-left));
      li.classList.toggle("due", left < 30);
    });
  }

  // --- vitals ------------------------------------------------------------------------------------------------
  // box: a .vital element; reading: {value, age_s, stale} or null; serverTimeIso of the event that carried it.
  function setVital(box, valueText, reading, serverTimeIso, limitS, offline) {
    const ageEl = box.querySelector(".v-age");
    if (!reading) {
      box.classList.add("none");
      box.classList.remove("stale");
      box._ref = null;
      setNews(box, null);
      setText(box.querySelector(".v-value"), "--");
      setText(ageEl, "not measured");
      return;
    }
    box._ref = refOf(reading.age_s, serverTimeIso);
    box._limit = limitS;
    box._offline = offline;
    box.classList.remove("none");
    setText(box.querySelector(".v-value"), valueText);
    setNews(box, reading.news2);
    tickVital(box);
  }

  // The parameter's NEWS2 sub-score (RCP 2017, scored by the server): 3 red, 1-2 amber, with the score as text so
  // an abnormal value never depends on colour alone.
  function setNews(box, score) {
    let flag = box.querySelector(".v-news");
    if (!flag) {
      flag = document.createElement("span");
      flag.className = "v-news";
      box.querySelector(".v-label").append(flag); // on the label line: the value line keeps its width
    }
    const s = typeof score === "number" ? score : 0;
    box.dataset.news = s >= 3 ? "high" : s >= 1 ? "mid" : "";
    setText(flag, s >= 1 ? "NEWS " + s : "");
  }

  function tickVital(box) {
    if (box._ref === null || box._ref === undefined) return;
    const age = ageSince(box._ref);
    if (age === null) return;
    const stale = age > box._limit || box._offline;
    box.classList.toggle("stale", stale);
    setText(box.querySelector(".v-age"), (stale ? "STALE " : "") + fmtAge(age));
  }

  function renderVitals(root, v, serverTimeIso, limits, offline) {
    const q = (name) => root.querySelector('.vital[data-vital="' + name + '"]');
    const put = (name, reading, digits) => {
      const box = q(name);
      if (box) setVital(box, reading ? fmt(reading.value, digits) : "--", reading, serverTimeIso, limits.stale, offline);
    };
    put("hr", v.heart_rate_bpm);
    put("spo2", v.spo2_pct);
    put("rr", v.resp_rate_per_min);
    put("etco2", v.etco2_mmhg);
    const nb = q("nibp");
    if (nb) {
      const n = v.nibp;
      setVital(nb, n ? fmt(n.sbp_mmhg) + "/" + fmt(n.dbp_mmhg) : "--", n, serverTimeIso, limits.nibp, offline);
    }
  }

  // --- ECG strips --------------------------------------------------------------------------------------------
  // A strip holds segments of one unit: {t0, t1 (device ms), fs, rows: [mv arrays per lead], leads, leadOff, gapBefore}
  // in sample-time order, and plays them back one chunk behind the newest sample, on the page's monotonic clock (no
  // wall clock involved). Live is ordered by sample time, never by seq: a segment that starts before the newest
  // sample held (a duplicate, a late chunk) is not added (the server filters the same way).
  const JOIN_SAMPLES = 2.5; // a hole longer than this many sample intervals is a gap (as the server's _ECG_JOIN_SAMPLES)
  let stripIds = 0;
  function newStrip() { return { id: ++stripIds, segs: [], headT: null, headPerf: 0, playT: null, lastChunkMs: 1000 }; }

  // Returns true when the segment was added (false: older than what the strip holds, or unreadable).
  function addSegment(strip, seg, windowS) {
    const t0 = parseT(seg.start_at);
    if (t0 === null || !seg.samples_mv || !seg.samples_mv.length) return false;
    const rows = Array.isArray(seg.samples_mv[0]) ? seg.samples_mv : [seg.samples_mv];
    const leads = seg.leads || [seg.lead];
    const leadOff = Array.isArray(seg.lead_off) ? seg.lead_off : [seg.lead_off];
    const n = rows[0].length;
    const sat = Array.isArray(seg.saturated) ? seg.saturated : [!!seg.saturated];
    const s = { t0: t0, fs: seg.fs_hz, rows: rows, leads: leads, leadOff: leadOff, saturated: sat, gapBefore: !!seg.gap_before };
    s.t1 = t0 + (1000 * n) / s.fs;
    if (strip.headT !== null && t0 < strip.headT - (JOIN_SAMPLES * 1000) / s.fs) return false;
    strip.segs.push(s);
    const keepFrom = s.t1 - (windowS + 2) * 1000;
    while (strip.segs.length > 1 && strip.segs[0].t1 < keepFrom) strip.segs.shift();
    strip.headT = s.t1;
    strip.headPerf = performance.now();
    strip.lastChunkMs = s.t1 - s.t0;
    return true;
  }

  // The standard grid (1 mm / 5 mm at 25 mm/s, 10 mm/mV) and the 1 mV calibration pulse, drawn once per canvas size
  // into a canvas of its own; the (opaque) strip is erased by copying the grid over the part to be redrawn, so that
  // the compositor has an opaque layer to put on screen (nothing to blend with the page under it).  The same image is
  // the canvas's CSS background until the first draw.
  const gridCache = new Map();
  function gridOf(W, H, pxmm, dpr) {
    const key = W + "x" + H + "@" + pxmm.toFixed(4) + "/" + dpr;
    let grid = gridCache.get(key);
    if (grid) return grid;
    const c = document.createElement("canvas");
    c.width = W; c.height = H;
    const g = c.getContext("2d");
    g.fillStyle = "#050607";
    g.fillRect(0, 0, W, H);
    for (let mm = 0, x = 0; x <= W; mm++, x = mm * pxmm) {
      g.fillStyle = mm % 5 === 0 ? "#4a2222" : "#221212";
      g.fillRect(Math.round(x), 0, 1, H);
    }
    for (let mm = 0, y = 0; y <= H; mm++, y = mm * pxmm) {
      g.fillStyle = mm % 5 === 0 ? "#4a2222" : "#221212";
      g.fillRect(0, Math.round(y), W, 1);
    }
    const baseY = H * 0.6, calX = 2 * pxmm, calW = 0.2 * 25 * pxmm, top = baseY - 10 * pxmm;
    g.strokeStyle = "#9aa4b2";
    g.lineWidth = 1.5 * dpr;
    g.beginPath();
    g.moveTo(0, baseY); g.lineTo(calX, baseY); g.lineTo(calX, top); g.lineTo(calX + calW, top);
    g.lineTo(calX + calW, baseY); g.lineTo(calX + calW + 2 * pxmm, baseY);
    g.stroke();
    grid = { canvas: c, url: "url(" + c.toDataURL("image/png") + ")" };
    if (gridCache.size > 32) gridCache.clear();
    gridCache.set(key, grid);
    return grid;
  }

  // Put the grid back over [x, x + w) x [y, y + h) of a strip (its "clear").
  function erase(st, x, y, w, h) {
    if (w <= 0 || h <= 0) return;
    st.ctx.drawImage(st.grid, x, y, w, h, x, y, w, h);
  }

  // Draw one lead of a strip at clinical scale (25 mm/s, 10 mm/mV) like a monitor: the pen sweeps left to right
  // and wraps, an erase bar runs ahead of it, and each call draws only the samples played since the previous call,
  // decimated to min/max per pixel column. Gaps stay gaps: the pen lifts across missing samples and the hole is
  // shaded and labelled, never bridged. A full redraw happens only when the canvas, the strip or the lead changes,
  // or playback jumped. pxPerMm: CSS px per mm of the display (96 dpi assumed, calibrate with ?mm=).
  // Returns true when the canvas is laid out (something may have been drawn).
  // Canvas sizes come from a ResizeObserver, not from reading clientWidth in the frame loop: a layout read there
  // would force a synchronous layout of the page whenever a text changed since the last frame.
  const sized = new ResizeObserver((entries) => {
    entries.forEach((e) => { e.target._cssW = e.contentRect.width; e.target._cssH = e.contentRect.height; });
  });
  function drawStrip(canvas, strip, leadIndex, opts) {
    const dpr = window.devicePixelRatio || 1;
    if (canvas._cssW === undefined) {
      sized.observe(canvas);
      canvas._cssW = canvas.clientWidth;
      canvas._cssH = canvas.clientHeight;
    }
    const cssW = Math.round(canvas._cssW), cssH = Math.round(canvas._cssH);
    if (!cssW || !cssH) return false;
    if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
      canvas.width = Math.round(cssW * dpr);
      canvas.height = Math.round(cssH * dpr);
    }
    const pxmm = opts.pxPerMm * dpr;
    const W = canvas.width, H = canvas.height;
    const key = W + "x" + H + "@" + pxmm + "/" + dpr;
    let st = canvas._ecg;
    if (!st || st.key !== key) {
      const grid = gridOf(W, H, pxmm, dpr);
      canvas.style.backgroundImage = grid.url;
      canvas.style.backgroundSize = cssW + "px " + cssH + "px";
      st = canvas._ecg = {
        key: key, ctx: canvas.getContext("2d", { alpha: false }), grid: grid.canvas, stripId: null, lead: null,
        lastT: null, pen: null,
      };
      erase(st, 0, 0, W, H);
    }
    const ctx = st.ctx;
    const x0 = Math.round(2 * pxmm + 0.2 * 25 * pxmm + 3 * pxmm);
    const spanPx = W - x0;
    if (spanPx <= 0) return true;
    const pxPerMs = (25 * pxmm) / 1000;
    const spanMs = spanPx / pxPerMs;
    const eraseMs = Math.max(8 * dpr, 4 * pxmm) / pxPerMs; // the erase bar: 4 mm ahead of the pen
    const fresh = st.stripId !== strip.id || st.lead !== leadIndex;
    if (!strip.segs.length || strip.headT === null) {
      if (fresh || st.lastT !== null) erase(st, 0, 0, W, H);
      st.stripId = strip.id; st.lead = leadIndex; st.lastT = null; st.pen = null;
      return true;
    }
    const lag = Math.min(strip.lastChunkMs || 1000, 2000) + 300;
    let playT = strip.headT - lag + (performance.now() - strip.headPerf);
    playT = Math.min(playT, strip.headT);
    if (strip.playT !== null && playT < strip.playT && strip.playT <= strip.headT) playT = strip.playT;
    strip.playT = playT;
    let ta = st.lastT;
    if (fresh || ta === null || playT < ta || playT - ta > spanMs - eraseMs) {
      erase(st, 0, 0, W, H);
      ta = playT - spanMs + eraseMs;
      st.pen = null;
    }
    st.stripId = strip.id; st.lead = leadIndex; st.lastT = playT;
    if (playT <= ta) return true;
    sweep(ctx, strip, leadIndex, ta, playT, { x0: x0, W: W, H: H, spanPx: spanPx, pxPerMs: pxPerMs, pxmm: pxmm,
      dpr: dpr, eraseMs: eraseMs }, st);
    return true;
  }

  const mod = (a, n) => ((a % n) + n) % n;

  // Clear the sweep positions [pa, pb) (px along the unwrapped sweep), wrapping at the right edge.
  function clearSweep(st, g, pa, pb) {
    if (pb - pa >= g.spanPx) { erase(st, g.x0, 0, g.spanPx, g.H); return; }
    const a = Math.floor(mod(pa, g.spanPx)), len = Math.ceil(pb - pa) + 1;
    if (a + len <= g.spanPx) erase(st, g.x0 + a, 0, len, g.H);
    else { erase(st, g.x0 + a, 0, g.spanPx - a, g.H); erase(st, g.x0, 0, len - (g.spanPx - a), g.H); }
  }

  function fillSweep(ctx, g, pa, pb) {
    const a = Math.floor(mod(pa, g.spanPx)), len = Math.floor(pb) - Math.floor(pa);
    if (len <= 0) return;
    if (a + len <= g.spanPx) ctx.fillRect(g.x0 + a, 0, len, g.H);
    else { ctx.fillRect(g.x0 + a, 0, g.spanPx - a, g.H); ctx.fillRect(g.x0, 0, len - (g.spanPx - a), g.H); }
  }

  // Draw the samples with times in (ta, tb] and erase ahead of them.
  function sweep(ctx, strip, leadIndex, ta, tb, g, st) {
    const P = (t) => t * g.pxPerMs; // unwrapped sweep position (px) of a sample time
    const lw = 2 * g.dpr;
    clearSweep(st, g, P(ta) + lw, P(tb + g.eraseMs) + lw);
    const baseY = g.H * 0.6, yScale = 10 * g.pxmm;
    ctx.strokeStyle = "#39ff6a";
    ctx.lineWidth = lw;
    ctx.lineJoin = "round";
    ctx.beginPath();
    if (st.pen) ctx.moveTo(st.pen.x, st.pen.y);
    let col = -1, first = 0, lo = 0, hi = 0, last = 0;
    const flush = () => {
      if (col < 0) return;
      const x = g.x0 + col + 0.5;
      if (!st.pen || col < st.pen.c) ctx.moveTo(x, first); else ctx.lineTo(x, first);
      if (lo !== first || hi !== first) { ctx.lineTo(x, lo); ctx.lineTo(x, hi); }
      ctx.lineTo(x, last);
      st.pen = { x: x, y: last, c: col };
      col = -1;
    };
    const holes = [];
    let prev = null;
    for (const s of strip.segs) {
      const dt = 1000 / s.fs;
      const hole = prev !== null && (s.gapBefore || s.t0 - prev.t1 > JOIN_SAMPLES * dt);
      const prevEnd = prev === null ? null : prev.t1;
      prev = s;
      if (hole && prevEnd < tb && s.t0 > ta) holes.push([prevEnd, s.t0]);
      if (s.t1 <= ta || s.t0 > tb) continue;
      const row = s.rows[Math.min(leadIndex, s.rows.length - 1)];
      const i0 = Math.max(0, Math.floor((ta - s.t0) / dt) + 1);
      const i1 = Math.min(row.length, Math.floor((tb - s.t0) / dt) + 1);
      if (hole && i0 === 0) { flush(); st.pen = null; } // a gap stays a gap: never a line across missing samples
      for (let i = i0; i < i1; i++) {
        const v = row[i];
        if (v === null || v === undefined) { flush(); st.pen = null; continue; }
        const c = Math.floor(mod(P(s.t0 + i * dt), g.spanPx));
        const y = baseY - v * yScale;
        if (c !== col) {
          flush();
          col = c; first = lo = hi = last = y;
        } else {
          if (y < lo) lo = y;
          if (y > hi) hi = y;
          last = y;
        }
      }
    }
    flush();
    ctx.stroke();
    holes.forEach(([a, b]) => {
      const from = Math.max(a, ta), to = Math.min(b, tb);
      if (to > from) {
        ctx.fillStyle = "rgba(255, 214, 10, 0.18)";
        fillSweep(ctx, g, P(from), P(to));
      }
      // the label once the sweep has passed it, so that the erase bar never cuts it
      const labelPx = 34 * g.dpr, at = a + labelPx / g.pxPerMs;
      if ((b - a) * g.pxPerMs > labelPx && at > ta && at <= tb) {
        const x = g.x0 + mod(P(a), g.spanPx);
        if (x + labelPx <= g.W) {
          ctx.fillStyle = "#ffd60a";
          ctx.font = Math.round(14 * g.dpr) + "px sans-serif";
          ctx.fillText("GAP", x + 4 * g.dpr, 18 * g.dpr);
        }
      }
    });
  }

  function stripState(strip, leadIndex, lost, offline) {
    if (!strip.segs.length) return "NO ECG";
    const last = strip.segs[strip.segs.length - 1];
    if (last.leadOff[Math.min(leadIndex, last.leadOff.length - 1)]) return "LEAD OFF";
    if (last.saturated[Math.min(leadIndex, last.saturated.length - 1)]) return "SIGNAL CLIPPED";
    if (lost || offline) return "ECG SIGNAL LOST";
    return "";
  }

  function stripLeads(strip) {
    return strip.segs.length ? strip.segs[strip.segs.length - 1].leads : [];
  }

  // --- alarm tones (Web Audio) -----------------------------------------------------------------------------
  // Burst patterns in the manner of IEC 60601-1-8 (table 3): pulses with a fundamental plus 4 harmonics.
  // high: 10 pulses (3+2, pause, 3+2), pulse 150 ms, spacing 100 ms, repeated every 10 s (2.5-15 s);
  // medium: 3 pulses of 200 ms, spacing 200 ms, repeated every 25 s (2.5-30 s);
  // low: 2 pulses of 200 ms, once (no repeat). Pulse rise/fall 20 ms (10-20 % of the pulse).
  const BURSTS = {
    high: { f0: 660, pulseS: 0.15, offsetsS: [0, 0.25, 0.5, 0.9, 1.15, 2.1, 2.35, 2.6, 3.0, 3.25], repeatS: 10 },
    medium: { f0: 523.25, pulseS: 0.2, offsetsS: [0, 0.4, 0.8], repeatS: 25 },
    low: { f0: 440, pulseS: 0.2, offsetsS: [0, 0.4], repeatS: null },
  };

  function makeAlarm() {
    let ctx = null;
    let wave = null;
    const log = [];
    window.__ghTones = log; // for tests and the benchmark: every burst scheduled, with its priority

    function context() {
      if (!ctx) {
        const C = window.AudioContext || window.webkitAudioContext;
        if (!C) return null;
        ctx = new C();
        const real = new Float32Array([0, 1, 0.6, 0.45, 0.35, 0.3]);
        const imag = new Float32Array(real.length);
        wave = ctx.createPeriodicWave(real, imag);
      }
      return ctx;
    }

    function burst(priority) {
      const spec = BURSTS[priority];
      const c = context();
      const entry = { priority: priority, perf: performance.now(), pulses: spec.offsetsS.length, state: c ? c.state : "none" };
      log.push(entry);
      if (log.length > 500) log.shift();
      if (!c || c.state !== "running") return entry;
      const start = c.currentTime + 0.02;
      spec.offsetsS.forEach((off) => {
        const osc = c.createOscillator();
        const gain = c.createGain();
        osc.setPeriodicWave(wave);
        osc.frequency.value = spec.f0;
        const t0 = start + off, t1 = t0 + spec.pulseS, ramp = Math.min(0.02, spec.pulseS * 0.2);
        gain.gain.setValueAtTime(0, t0);
        gain.gain.linearRampToValueAtTime(0.25, t0 + ramp);
        gain.gain.setValueAtTime(0.25, t1 - ramp);
        gain.gain.linearRampToValueAtTime(0, t1);
        osc.connect(gain).connect(c.destination);
        osc.start(t0);
        osc.stop(t1 + 0.01);
      });
      return entry;
    }

    return {
      burst: burst,
      running: () => !!ctx && ctx.state === "running",
      enable: () => { const c = context(); return c ? c.resume() : Promise.resolve(); },
      probe: () => { context(); return ctx ? ctx.state : "none"; },
      bursts: BURSTS,
    };
  }

  // ?mm=3.78 calibrates CSS px per mm of the physical display so the grid is true millimetres.
  function pxPerMm() {
    const v = parseFloat(new URLSearchParams(location.search).get("mm"));
    return v > 0 && v < 50 ? v : 96 / 25.4;
  }

  return {
    PRIO_RANK, PRIO_TEXT, CASE_TEXT, DEPT_TEXT, STATUS_TEXT,
    parseT, syncServer, serverNow, refOf, ageSince,
    setText, fmtAge, fmtClock, fmtCountdown, fmt, ageBand, el,
    connectFeed, renderLink, postAck, renderActivations, tickActivations, checkSession,
    setVital, tickVital, renderVitals,
    newStrip, addSegment, drawStrip, stripState, stripLeads,
    makeAlarm, pxPerMm,
  };
})();
