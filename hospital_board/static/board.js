// GoldenHour ED big-screen board.
// Live feed: EventSource on /api/events (auto-reconnect + watchdog; every (re)connect starts with a full snapshot).
// Alerts announce themselves by priority in the manner of IEC 60601-1-8: high = red, flashing 2 Hz, 10-pulse tone
// burst every 10 s; medium = yellow, flashing 0.5 Hz, 3-pulse burst every 25 s; low = cyan, steady, 2 pulses once.
// "Silence" pauses the tones for 2 min without acknowledging (visible countdown); visual signals keep going until
// acknowledgement; a new alert or a new escalation sounds again at once.
// All text from crews, units or hospitals goes through textContent (FF-16).
"use strict";

(function () {
  const G = window.GH;
  const HOSPITAL = document.body.dataset.hospital;
  const params = new URLSearchParams(location.search);
  const BENCH = params.get("bench") === "1";
  // ?bench=1&ecg=full: redraw every visible strip whole on every frame (the benchmark's baseline for the renderer)
  const FULL_REDRAW = BENCH && params.get("ecg") === "full";
  const SILENCE_MS = 120000;
  // ECG strips: one requestAnimationFrame loop draws every visible strip incrementally (only the samples played since
  // the previous frame, see GH.drawStrip), at most ECG_MAX_FPS times a second (the display's rate when that is lower);
  // DOM text is written in that loop, and only when it changed.
  // ECG of strips off screen: the page tells the server which strips are on screen (PUT /api/events/{feed}/strips,
  // feed = this page's random key); its feed then carries the ECG of those units only, and a unit coming into view
  // gets its last window first.  Until the server has been told (and after each reconnection, which resets it) the
  // feed carries every unit's ECG: a strip off screen keeps those events undecoded until it comes into view.
  const FEED_KEY = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
  const STRIPS_DEBOUNCE_MS = 150;
  const ECG_AWAIT_MS = 3000; // a strip coming back into view waits this long for its window before saying NO ECG
  const ECG_MAX_FPS = 40;
  const ECG_PENDING_MAX = 32; // undecoded ECG events kept per off-screen strip (1-s chunks: 3 windows' worth)
  // Visual alarm signals (IEC 60601-1-8): flashing period per priority, 50 % duty, from one clock for the whole board.
  const FLASH_PERIOD_MS = { high: 500, medium: 2000 };

  if (params.get("layout") === "wall") document.body.classList.add("layout-wall");

  const cardsEl = document.getElementById("cards");
  const emptyEl = document.getElementById("empty");
  const moreEl = document.getElementById("more");
  const linkEl = document.getElementById("link");
  const clockEl = document.getElementById("clock");
  const countEl = document.getElementById("count");
  const soundBtn = document.getElementById("sound");
  const silenceBtn = document.getElementById("silence");
  const template = document.getElementById("card-template");

  let limits = { stale: 10, nibp: 300, gps: 30, ecgWindow: 10 };
  const units = new Map(); // unit_id -> {data, el, strip, t (server_time of the card), visible}
  const alarm = G.makeAlarm();
  const silencedUntil = new Map(); // sound key -> performance.now() deadline
  const sounded = new Set(); // sound keys that have sounded at least once
  let nextBurstPerf = 0;
  const bench = { vitals: [], alerts: [], frames: 0, stripDraws: 0, drawMs: 0, seenAlerts: new Set() };
  if (BENCH) window.__ghBench = bench;
  window.__ghBoard = { units: units, silencedUntil: silencedUntil, alarm: alarm, feedKey: FEED_KEY };

  // A strip is drawn only while its canvas is on screen (a card below the fold, or cut under the strip, costs nothing);
  // the ECG events it kept undecoded while off screen are decoded when it comes into view.
  const observer = new IntersectionObserver((entries) => {
    entries.forEach((e) => {
      const u = units.get(e.target.dataset.unit);
      if (!u) return;
      u.visible = e.isIntersecting;
      if (u.visible && u.ecgExcluded) restartStrip(u); // its window is on its way
      else if (u.visible) takePendingEcg(u);
      scheduleStrips();
    });
  });
  // Cards whose top is in the bottom 40 px of the window or below it ("more inbound below"), without reading the
  // layout of every card in the once-a-second tick.
  const foldObserver = new IntersectionObserver((entries) => {
    entries.forEach((e) => {
      const u = units.get(e.target.dataset.unit);
      if (u) u.below = !e.isIntersecting && !!e.rootBounds && e.boundingClientRect.top >= e.rootBounds.bottom;
    });
  }, { rootMargin: "0px 0px -40px 0px" });

  function primaryAlert(u) { return u.data.alerts.length ? u.data.alerts[0] : null; }

  function needsAttention(a) { return a && a.state !== "acknowledged" && a.state !== "cancelled"; }

  // A key that changes when the alert needs attention anew: a new alert, or a new escalation step.
  function soundKey(a) {
    const esc = (a.activations || []).filter((x) => x.state === "escalated").map((x) => x.department + ":" + x.level);
    return a.alert_id + "|" + esc.sort().join(",");
  }

  function sortKey(u) {
    const a = primaryAlert(u);
    if (!a) return [9, Infinity, u.data.unit_id];
    return [G.PRIO_RANK[a.priority], a.eta_at ? G.parseT(a.eta_at) : Infinity, u.data.unit_id];
  }

  function compare(x, y) {
    const a = sortKey(x), b = sortKey(y);
    for (let i = 0; i < 3; i++) { if (a[i] < b[i]) return -1; if (a[i] > b[i]) return 1; }
    return 0;
  }

  function reorder() {
    const list = Array.from(units.values()).sort(compare);
    list.forEach((u, i) => { if (cardsEl.children[i] !== u.el) cardsEl.insertBefore(u.el, cardsEl.children[i] || null); });
    emptyEl.classList.toggle("hidden", list.length > 0);
    cardsEl.classList.toggle("dense", list.length > 2);
    G.setText(countEl, list.length + " inbound");
  }

  // --- cards (textContent only) ----------------------------------------------------------------------------

  function ensureUnit(card) {
    let u = units.get(card.unit_id);
    if (!u) {
      const el = template.content.firstElementChild.cloneNode(true);
      el.dataset.unit = card.unit_id;
      u = {
        data: card, el: el, strip: G.newStrip(), t: null, visible: false, vitalsDirty: false, // visible: set by the observer
        pendingEcg: [], below: false, ecgExcluded: false, ecgCutoff: null, ecgAwaitUntil: 0,
        canvas: el.querySelector("canvas.ecg"), ecgLabel: el.querySelector(".ecg-label"),
        ecgState: el.querySelector(".ecg-state"), ecgLabelText: null, ecgStateText: null,
      };
      el.querySelector(".foot button.ack").addEventListener("click", (ev) => { ev.stopPropagation(); acknowledge(u, null); });
      const details = el.querySelector("a.details");
      details.href = "/unit/" + encodeURIComponent(card.unit_id) + "?hospital=" + encodeURIComponent(HOSPITAL);
      details.addEventListener("click", (ev) => ev.stopPropagation());
      el.addEventListener("click", () => { location.href = details.href; });
      units.set(card.unit_id, u);
      cardsEl.appendChild(el);
      u.canvas.dataset.unit = card.unit_id;
      // a new card while the server sends only the strips on screen: its ECG does not come until it is shown
      if (stripsSent !== null) u.ecgExcluded = true;
      observer.observe(u.canvas);
      foldObserver.observe(el);
    }
    return u;
  }

  function dropUnit(x) {
    observer.unobserve(x.canvas);
    foldObserver.unobserve(x.el);
    x.el.remove();
    units.delete(x.data.unit_id);
  }

  function setCard(card, serverTime) {
    const u = ensureUnit(card);
    u.data = card;
    u.t = serverTime;
    u.strip = G.newStrip();
    u.pendingEcg = []; // the card carries the server's whole window, which holds them
    u.ecgAwaitUntil = 0;
    card.ecg.forEach((seg) => G.addSegment(u.strip, seg, limits.ecgWindow));
    renderAlert(u);
    renderUnitState(u);
    renderVitals(u);
    renderPosition(u, serverTime);
  }

  function renderAlert(u) {
    const el = u.el;
    const a = primaryAlert(u);
    el.classList.remove("prio-high", "prio-medium", "prio-low", "flash-high", "flash-medium");
    if (!a) return;
    el.classList.add("prio-" + a.priority);
    el.dataset.alert = a.alert_id;
    el.dataset.state = a.state;
    G.setText(el.querySelector(".prio-text"), G.PRIO_TEXT[a.priority] || a.priority);
    G.setText(el.querySelector(".case-type"), G.CASE_TEXT[a.case_type] || a.case_type);
    G.setText(el.querySelector(".unit-id"), "Unit " + a.unit_id);
    G.setText(el.querySelector(".patient"), G.ageBand(a.age_years) + ", " + a.sex);
    G.setText(el.querySelector(".note"), a.note || "");
    const delayed = el.querySelector(".delayed");
    const sent = G.parseT(a.sent_at);
    delayed.classList.toggle("hidden", !a.historical && !a.resynced);
    G.setText(delayed, a.historical ? "DELAYED - sent " + G.fmtClock(sent) : a.resynced ? "RESYNCED" : "");

    const chips = el.querySelector(".chips");
    chips.replaceChildren();
    const addChip = (text, cls) => chips.appendChild(G.el("span", "chip" + (cls ? " " + cls : ""), text));
    if (!(a.activations && a.activations.length)) a.departments.forEach((d) => addChip(G.DEPT_TEXT[d] || d));
    if (a.ecg_st_elevation) addChip("ST elevation", "finding");
    if (a.be_fast_positive) addChip("BE-FAST positive", "finding");
    if (a.lams !== null && a.lams !== undefined) addChip("LAMS " + a.lams, "finding");
    if (a.gcs_total !== null && a.gcs_total !== undefined) addChip("GCS " + a.gcs_total, "finding");
    a.trauma_red_criteria.forEach((t) => addChip(t, "finding"));

    const reasons = el.querySelector(".reasons");
    reasons.replaceChildren();
    a.reasons.forEach((r) => reasons.appendChild(G.el("li", null, r)));

    G.renderActivations(el.querySelector(".acts"), a, u.t, (dept, button) => acknowledge(u, dept, button));

    const acked = a.state === "acknowledged";
    const button = el.querySelector(".foot button.ack");
    button.classList.toggle("hidden", acked);
    button.disabled = false;
    G.setText(button, a.activations && a.activations.length > 1 ? "Acknowledge all" : "Acknowledge");
    const ackState = el.querySelector(".ack-state");
    ackState.classList.remove("error");
    ackState.classList.toggle("done", acked);
    if (acked) {
      const at = G.parseT(a.acknowledged_at);
      G.setText(ackState, "ACKNOWLEDGED " + (at ? G.fmtClock(at, true) : "") + (a.acknowledged_by ? " by " + a.acknowledged_by : ""));
    } else {
      G.setText(ackState, a.state === "escalated" ? "ESCALATED - not yet acknowledged" : "Not acknowledged");
    }
    // Visual alarm signal while it needs attention (historical too: a delayed pre-alert is shown, never silent).
    if (needsAttention(a) && (a.priority === "high" || a.priority === "medium")) el.classList.add("flash-" + a.priority);
    el.classList.toggle("escalated", a.state === "escalated");
    updateSound(true);
  }

  function renderUnitState(u) {
    const d = u.data;
    const avail = u.el.querySelector(".availability");
    avail.classList.toggle("offline", d.availability === "offline");
    G.setText(avail, d.availability === "offline" ? "OFFLINE - link lost" : d.availability === "online" ? "online" : "");
    G.setText(u.el.querySelector(".crew-status"), d.crew_status ? G.STATUS_TEXT[d.crew_status] || d.crew_status : "");
  }

  function renderVitals(u) {
    G.renderVitals(u.el, u.data.vitals, u.vitalsT || u.t, limits, u.data.availability === "offline");
  }

  function renderPosition(u, serverTime) {
    const p = u.data.position;
    const el = u.el.querySelector(".position");
    el.classList.remove("none", "lost", "stale");
    u.posRef = null;
    if (!p.has_position) {
      el.classList.add("none");
      G.setText(el, "NO POSITION");
      return;
    }
    u.posRef = G.refOf(p.age_s, serverTime);
    u.posText = Number(p.lat_deg).toFixed(4) + ", " + Number(p.lon_deg).toFixed(4);
    u.posLost = p.fix_lost;
    tickPosition(u);
  }

  function tickPosition(u) {
    if (u.posRef === null || u.posRef === undefined) return;
    const el = u.el.querySelector(".position");
    const age = G.ageSince(u.posRef);
    const stale = age !== null && age > limits.gps;
    el.classList.toggle("lost", u.posLost);
    el.classList.toggle("stale", stale && !u.posLost);
    const ageText = G.fmtAge(age);
    if (u.posLost) G.setText(el, "GPS LOST - last known " + u.posText + " (" + ageText + ")");
    else G.setText(el, (stale ? "POSITION OLD " : "Position ") + u.posText + " (" + ageText + ")");
  }

  function renderEta(u) {
    const a = primaryAlert(u);
    const etaEl = u.el.querySelector(".eta");
    const valueEl = u.el.querySelector(".eta-value");
    const clockEl2 = u.el.querySelector(".eta-clock");
    const now = G.serverNow();
    if (!a || !a.eta_at || now === null) { G.setText(valueEl, "unknown"); G.setText(clockEl2, ""); etaEl.classList.remove("due"); return; }
    const etaMs = G.parseT(a.eta_at);
    const left = Math.round((etaMs - now) / 1000);
    etaEl.classList.toggle("due", left <= 60);
    if (left <= 0) G.setText(valueEl, left > -60 ? "ARRIVING" : "due " + Math.floor(-left / 60) + " min ago");
    else G.setText(valueEl, G.fmtCountdown(left));
    G.setText(clockEl2, "(" + G.fmtClock(etaMs) + ")");
  }

  // --- acknowledge --------------------------------------------------------------------------------------------

  async function acknowledge(u, department, deptButton) {
    const a = primaryAlert(u);
    if (!a) return;
    const button = deptButton || u.el.querySelector(".foot button.ack");
    const state = u.el.querySelector(".ack-state");
    button.disabled = true;
    G.setText(state, "Sending...");
    try {
      const alert = await G.postAck(HOSPITAL, a.alert_id, department, "ed_staff");
      u.data.alerts = u.data.alerts.map((x) => (x.alert_id === alert.alert_id ? alert : x));
      renderAlert(u);
    } catch (err) {
      button.disabled = false;
      state.classList.add("error");
      G.setText(state, "NOT DELIVERED - press again (" + (err && err.message ? err.message : "error") + ")");
    }
  }

  // --- sound and silence --------------------------------------------------------------------------------------

  function attentionAlerts() {
    const out = [];
    units.forEach((u) => u.data.alerts.forEach((a) => { if (needsAttention(a)) out.push(a); }));
    return out;
  }

  function updateSound(fromChange) {
    const now = performance.now();
    silencedUntil.forEach((until, key) => { if (until <= now) silencedUntil.delete(key); });
    const active = attentionAlerts().filter((a) => !silencedUntil.has(soundKey(a)));
    const fresh = active.filter((a) => !sounded.has(soundKey(a)));
    if (!active.length) { nextBurstPerf = 0; return; }
    const top = active.reduce((best, a) => (G.PRIO_RANK[a.priority] < G.PRIO_RANK[best.priority] ? a : best));
    const repeatS = alarm.bursts[top.priority].repeatS;
    if (fresh.length || (repeatS !== null && now >= nextBurstPerf && !fromChange)) {
      const loudest = (fresh.length ? fresh : active).reduce((b, a) => (G.PRIO_RANK[a.priority] < G.PRIO_RANK[b.priority] ? a : b));
      alarm.burst(loudest.priority);
      active.forEach((a) => sounded.add(soundKey(a)));
      nextBurstPerf = now + (repeatS || 3600) * 1000;
    }
  }

  function silence() {
    const now = performance.now();
    if (silencedUntil.size) { silencedUntil.clear(); nextBurstPerf = 0; updateSound(false); renderSilence(); return; }
    attentionAlerts().forEach((a) => silencedUntil.set(soundKey(a), now + SILENCE_MS));
    renderSilence();
  }

  function renderSilence() {
    const now = performance.now();
    let maxLeft = 0;
    silencedUntil.forEach((until) => { maxLeft = Math.max(maxLeft, until - now); });
    silenceBtn.classList.toggle("paused", maxLeft > 0);
    G.setText(silenceBtn, maxLeft > 0 ? "AUDIO PAUSED " + G.fmtCountdown(maxLeft / 1000) + " - resume" : "Silence 2 min");
    units.forEach((u) => {
      const badge = u.el.querySelector(".silenced");
      const a = primaryAlert(u);
      const until = a ? silencedUntil.get(soundKey(a)) : undefined;
      const left = until ? until - now : 0;
      badge.classList.toggle("hidden", !(left > 0 && needsAttention(a)));
      G.setText(badge, left > 0 ? "SILENCED " + G.fmtCountdown(left / 1000) : "");
    });
    const running = alarm.running();
    soundBtn.classList.toggle("hidden", running);
  }

  soundBtn.addEventListener("click", () => { alarm.enable().then(() => { sounded.clear(); updateSound(false); renderSilence(); }); });
  silenceBtn.addEventListener("click", silence);

  // --- ECG ------------------------------------------------------------------------------------------------------

  // Strips on screen -> server (one request at a time; the latest set wins).
  let stripsSent = null; // units the server was last told, for this connection (null: not told, every unit's ECG)
  let stripsBusy = false, stripsTimer = null, stripsRetry = null;
  function scheduleStrips() {
    if (stripsTimer === null) stripsTimer = setTimeout(() => { stripsTimer = null; sendStrips(); }, STRIPS_DEBOUNCE_MS);
  }
  async function sendStrips() {
    if (stripsBusy) { scheduleStrips(); return; }
    const shown = Array.from(units.values()).filter((x) => x.visible).map((x) => x.data.unit_id).sort();
    if (stripsSent !== null && shown.join(",") === stripsSent.join(",")) return;
    stripsBusy = true;
    const epoch = feedEpoch;
    try {
      const res = await fetch("/api/events/" + FEED_KEY + "/strips", {
        method: "PUT", credentials: "same-origin", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ hospital_id: HOSPITAL, units: shown }),
      });
      if (!res.ok) throw new Error("HTTP " + res.status);
      const answer = await res.json();
      if (epoch !== feedEpoch) return; // reconnected meanwhile: that feed is gone, the new one starts unfiltered
      const cutoff = G.parseT(answer.server_time);
      const on = new Set(shown);
      units.forEach((x) => {
        const excluded = !on.has(x.data.unit_id);
        if (excluded && !x.ecgExcluded) { x.ecgCutoff = cutoff; x.pendingEcg = []; }
        x.ecgExcluded = excluded;
      });
      stripsSent = shown;
    } catch (err) {
      // not connected yet, or a server without the route: every unit's ECG keeps coming; try again later
      if (stripsRetry === null) stripsRetry = setTimeout(() => { stripsRetry = null; scheduleStrips(); }, 2000);
    } finally {
      stripsBusy = false;
    }
  }

  // A strip that comes back into view after its ECG stopped coming: start it afresh with the window the server sends
  // (never join its old samples to the window: the hole would be drawn as a gap the patient never had).  An event
  // already on its way from before the server stopped sending carries a server_time up to ecgCutoff: dropped.
  function restartStrip(u) {
    u.strip = G.newStrip();
    u.pendingEcg = [];
    u.ecgExcluded = false;
    u.ecgAwaitUntil = performance.now() + ECG_AWAIT_MS;
  }

  function takePendingEcg(u) {
    const texts = u.pendingEcg;
    if (!texts.length) return;
    u.pendingEcg = [];
    texts.forEach((text) => {
      let ev;
      try { ev = JSON.parse(text); } catch (e) { return; }
      G.addSegment(u.strip, ev.segment, limits.ecgWindow);
    });
  }

  // The flashing phase of each priority, toggled on #cards only when it changes (2 Hz: every 250 ms).
  const flashOn = { high: null, medium: null };
  function flashPhase(now) {
    Object.keys(FLASH_PERIOD_MS).forEach((p) => {
      const period = FLASH_PERIOD_MS[p];
      const on = now % period < period / 2;
      if (on !== flashOn[p]) { flashOn[p] = on; cardsEl.classList.toggle("flash-on-" + p, on); }
    });
  }

  const PXMM = G.pxPerMm();
  let stripBudget = 1, lastFrameT = null;
  function frame(now) {
    let drawn = 0;
    const t0 = BENCH ? performance.now() : 0;
    flashPhase(now);
    // strips in this frame? A budget of ECG_MAX_FPS frames a second (at 60 Hz: two frames of three).
    stripBudget = Math.min(2, stripBudget + (lastFrameT === null ? 1 : ((now - lastFrameT) * ECG_MAX_FPS) / 1000));
    lastFrameT = now;
    const strips = stripBudget >= 0.999;
    if (strips) stripBudget -= 1;
    units.forEach((u) => {
      if (u.vitalsDirty) { u.vitalsDirty = false; renderVitals(u); }
      if (!u.visible || !strips) return;
      if (FULL_REDRAW && u.canvas._ecg) u.canvas._ecg.lastT = null;
      if (G.drawStrip(u.canvas, u.strip, 0, { pxPerMm: PXMM })) drawn++;
      const leads = G.stripLeads(u.strip);
      const label = (leads.length ? "Lead " + leads[0] + "  " : "") + "25 mm/s  10 mm/mV";
      if (label !== u.ecgLabelText) { u.ecgLabelText = label; u.ecgLabel.textContent = label; }
      let state = G.stripState(u.strip, 0, u.data.ecg_lost, u.data.availability === "offline");
      if (!u.strip.segs.length && now < u.ecgAwaitUntil && !u.data.ecg_lost) state = ""; // its window is on its way
      if (state !== u.ecgStateText) { u.ecgStateText = state; u.ecgState.textContent = state; }
    });
    if (BENCH && drawn) { bench.frames++; bench.stripDraws += drawn; bench.drawMs += performance.now() - t0; }
    window.requestAnimationFrame(frame);
  }

  // --- feed ---------------------------------------------------------------------------------------------------

  let feedEpoch = 0;
  function onSnapshot(snap) {
    // a (re)connection: a new feed, which carries every unit's ECG until told otherwise
    feedEpoch++;
    stripsSent = null;
    limits = {
      stale: snap.stale_after_s, nibp: snap.nibp_stale_after_s, gps: snap.gps_stale_after_s || 30,
      ecgWindow: snap.ecg_window_s,
    };
    const keep = new Set(snap.cards.map((c) => c.unit_id));
    units.forEach((u, id) => { if (!keep.has(id)) dropUnit(u); });
    snap.cards.forEach((c) => { setCard(c, snap.server_time); u(c.unit_id).vitalsT = snap.server_time; });
    units.forEach((x) => { x.ecgExcluded = false; x.ecgCutoff = null; });
    reorder();
    tick();
    scheduleStrips();
  }

  const u = (id) => units.get(id);

  function benchAlert(ev) {
    if (!BENCH || bench.seenAlerts.has(ev.alert.alert_id) || !ev.alert.sent_at) return;
    bench.seenAlerts.add(ev.alert.alert_id);
    bench.alerts.push(Date.now() - G.parseT(ev.alert.sent_at));
  }

  const handlers = {
    snapshot: onSnapshot,
    tick: () => {},
    alert: (ev) => {
      benchAlert(ev);
      setCard(ev.card, ev.server_time);
      u(ev.card.unit_id).vitalsT = ev.server_time;
      reorder();
    },
    removed: (ev) => {
      const x = u(ev.unit_id);
      if (x) dropUnit(x);
      reorder();
      updateSound(true);
    },
    vitals: (ev) => {
      const x = u(ev.unit_id);
      if (BENCH && ev.vitals.heart_rate_bpm) bench.vitals.push(Date.now() - G.parseT(ev.vitals.heart_rate_bpm.measured_at));
      if (x) { x.data.vitals = ev.vitals; x.vitalsT = ev.server_time; x.vitalsDirty = true; } // drawn in the next frame
    },
    position: (ev) => { const x = u(ev.unit_id); if (x) { x.data.position = ev.position; renderPosition(x, ev.server_time); } },
    unit: (ev) => {
      const x = u(ev.unit_id);
      if (!x) return;
      x.data.availability = ev.availability;
      x.data.crew_status = ev.crew_status;
      x.data.ecg_lost = ev.ecg_lost;
      renderUnitState(x);
      renderVitals(x);
    },
    ecg: (ev) => { const x = u(ev.unit_id); if (x) { G.addSegment(x.strip, ev.segment, limits.ecgWindow); x.data.ecg_lost = false; } },
    gap: () => {},
  };

  // ECG events arrive undecoded (about 2 kB of JSON each, one per unit per second): only a strip on screen decodes
  // its own; an off-screen one keeps the text (bounded) for when it comes into view.  The unit id is read from the
  // start of the event (EcgEvent: server_time, unit_id, segment), ids being opaque [A-Za-z0-9_-].
  const ECG_UNIT = /"unit_id":"([A-Za-z0-9_-]{1,32})"/;
  const rawHandlers = {
    ecg: (text) => {
      const m = ECG_UNIT.exec(text);
      const x = m && u(m[1]);
      if (!x) return;
      x.data.ecg_lost = false;
      if (x.visible) {
        let ev;
        try { ev = JSON.parse(text); } catch (e) { return; }
        if (ev.unit_id !== x.data.unit_id) return;
        if (x.ecgCutoff !== null && !(G.parseT(ev.server_time) > x.ecgCutoff)) return; // sent before it stopped
        G.addSegment(x.strip, ev.segment, limits.ecgWindow);
        return;
      }
      if (x.ecgExcluded) return; // on its way from before the server stopped sending it: restarted when shown
      x.pendingEcg.push(text);
      if (x.pendingEcg.length > ECG_PENDING_MAX) x.pendingEcg.shift();
    },
  };

  function tick() {
    const now = G.serverNow();
    G.setText(clockEl, now === null ? "--:--" : G.fmtClock(now, true));
    units.forEach((x) => {
      renderEta(x);
      x.el.querySelectorAll(".vital").forEach(G.tickVital);
      tickPosition(x);
      G.tickActivations(x.el.querySelector(".acts"));
    });
    updateSound(false);
    renderSilence();
    const below = Array.from(units.values()).filter((x) => x.below);
    moreEl.classList.toggle("hidden", below.length === 0);
    moreEl.classList.toggle("urgent", below.some((x) => { const a = primaryAlert(x); return a && a.priority === "high" && needsAttention(a); }));
    G.setText(moreEl, below.length ? below.length + " more inbound below: " + below.map((x) => {
      const a = primaryAlert(x);
      return x.data.unit_id + (a ? " (" + a.priority.toUpperCase() + ")" : "");
    }).join(", ") : "");
  }

  reorder();
  G.connectFeed("/api/events?hospital=" + encodeURIComponent(HOSPITAL) + "&feed=" + FEED_KEY, handlers,
    (s) => G.renderLink(linkEl, s), 8000, rawHandlers);
  alarm.probe();
  renderSilence();
  setInterval(tick, 500);
  window.requestAnimationFrame(frame);
})();
