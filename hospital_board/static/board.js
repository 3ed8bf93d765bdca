// GoldenHour ED board page.
// Live feed: EventSource on /api/events (auto-reconnect; every (re)connect starts with a full snapshot).
// All text from crews, units or hospitals goes through textContent, never through an HTML parser (FF-16).
// ECG strip at clinical scale: 25 mm/s, 10 mm/mV, 1 mm / 5 mm grid, 1 mV calibration pulse.
"use strict";

(function () {
  const HOSPITAL = document.body.dataset.hospital;
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
  const MM_PER_S = 25;
  const MM_PER_MV = 10;
  const CSS_PX_PER_MM = 96 / 25.4;

  const cardsEl = document.getElementById("cards");
  const emptyEl = document.getElementById("empty");
  const linkEl = document.getElementById("link");
  const clockEl = document.getElementById("clock");
  const countEl = document.getElementById("count");
  const template = document.getElementById("card-template");

  let staleAfterS = 10;
  let nibpStaleAfterS = 300;
  let ecgWindowS = 10;
  let offsetMs = 0; // server clock - local clock
  const units = new Map(); // unit_id -> {data, el, ecg: [{t0, fs, mv, leadOff, lead}], playT, headT, headLocal}

  const serverNow = () => Date.now() + offsetMs;
  const parseT = (iso) => (iso ? Date.parse(iso) : null);
  const setText = (el, text) => { if (el.textContent !== text) el.textContent = text; };

  function fmtAge(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    return Math.floor(s / 3600) + " h ago";
  }

  function ageBand(age) {
    if (age === null || age === undefined) return "age ?";
    if (age < 1) return "<1 y";
    if (age < 18) return "child " + age + " y";
    const lo = Math.floor(age / 10) * 10;
    return lo + "-" + (lo + 9) + " y";
  }

  function primaryAlert(u) { return u.data.alerts.length ? u.data.alerts[0] : null; }

  function sortKey(u) {
    const a = primaryAlert(u);
    if (!a) return [9, Infinity, u.data.unit_id];
    return [PRIO_RANK[a.priority], a.eta_at ? parseT(a.eta_at) : Infinity, u.data.unit_id];
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
    setText(countEl, list.length + " inbound");
  }

  // --- card rendering (textContent only) ------------------------------------------------------------------

  function ensureUnit(card) {
    let u = units.get(card.unit_id);
    if (!u) {
      const el = template.content.firstElementChild.cloneNode(true);
      el.dataset.unit = card.unit_id;
      u = { data: card, el: el, ecg: [], playT: null, headT: null, headLocal: 0, flashFor: null };
      el.querySelector("button.ack").addEventListener("click", () => acknowledge(u));
      units.set(card.unit_id, u);
      cardsEl.appendChild(el);
    }
    return u;
  }

  function setCard(card) {
    const u = ensureUnit(card);
    u.data = card;
    u.ecg = [];
    u.playT = null;
    card.ecg.forEach((seg) => addSegment(u, seg));
    renderAlert(u);
    renderUnitState(u);
    renderVitals(u);
    renderPosition(u);
  }

  function renderAlert(u) {
    const el = u.el;
    const a = primaryAlert(u);
    el.classList.remove("prio-high", "prio-medium", "prio-low", "flash-high", "flash-medium");
    if (!a) return;
    el.classList.add("prio-" + a.priority);
    el.dataset.alert = a.alert_id;
    setText(el.querySelector(".prio-text"), PRIO_TEXT[a.priority] || a.priority);
    setText(el.querySelector(".case-type"), CASE_TEXT[a.case_type] || a.case_type);
    setText(el.querySelector(".unit-id"), "Unit " + a.unit_id);
    setText(el.querySelector(".patient"), ageBand(a.age_years) + ", " + a.sex);
    setText(el.querySelector(".note"), a.note || "");

    const chips = el.querySelector(".chips");
    chips.replaceChildren();
    const addChip = (text, cls) => {
      const c = document.createElement("span");
      c.className = "chip" + (cls ? " " + cls : "");
      c.textContent = text;
      chips.appendChild(c);
    };
    a.departments.forEach((d) => addChip(DEPT_TEXT[d] || d));
    if (a.ecg_st_elevation) addChip("ST elevation", "finding");
    if (a.be_fast_positive) addChip("BE-FAST positive", "finding");
    if (a.lams !== null && a.lams !== undefined) addChip("LAMS " + a.lams, "finding");
    if (a.gcs_total !== null && a.gcs_total !== undefined) addChip("GCS " + a.gcs_total, "finding");
    a.trauma_red_criteria.forEach((t) => addChip(t, "finding"));
    if (a.historical) addChip("REPLAYED (historical)");

    const reasons = el.querySelector(".reasons");
    reasons.replaceChildren();
    a.reasons.forEach((r) => { const li = document.createElement("li"); li.textContent = r; reasons.appendChild(li); });

    const acked = a.state === "acknowledged";
    const button = el.querySelector("button.ack");
    button.classList.toggle("hidden", acked);
    button.disabled = false;
    const ackState = el.querySelector(".ack-state");
    ackState.classList.remove("error");
    ackState.classList.toggle("done", acked);
    if (acked) {
      const at = a.acknowledged_at ? new Date(parseT(a.acknowledged_at)).toLocaleTimeString() : "";
      setText(ackState, "ACKNOWLEDGED " + at + (a.acknowledged_by ? " by " + a.acknowledged_by : ""));
    } else {
      setText(ackState, a.state === "escalated" ? "ESCALATED - not yet acknowledged" : "Not acknowledged");
    }
    // Flash only live, unacknowledged high / medium alerts; low priority is steady cyan.
    if (!acked && !a.historical && (a.priority === "high" || a.priority === "medium")) {
      el.classList.add("flash-" + a.priority);
    }
  }

  function renderUnitState(u) {
    const d = u.data;
    const avail = u.el.querySelector(".availability");
    avail.classList.toggle("offline", d.availability === "offline");
    setText(avail, d.availability === "offline" ? "OFFLINE - link lost" : d.availability === "online" ? "online" : "");
    setText(u.el.querySelector(".crew-status"), d.crew_status ? STATUS_TEXT[d.crew_status] || d.crew_status : "");
  }

  function fmt(v, digits) { return v === null || v === undefined ? "--" : Number(v).toFixed(digits || 0); }

  function setVital(u, name, valueText, measuredAt, limitS) {
    const box = u.el.querySelector('.vital[data-vital="' + name + '"]');
    const ageEl = box.querySelector(".v-age");
    if (!measuredAt) {
      box.classList.add("none");
      box.classList.remove("stale");
      setText(box.querySelector(".v-value"), "--");
      setText(ageEl, "not measured");
      return;
    }
    const ageMs = serverNow() - parseT(measuredAt);
    const stale = ageMs > limitS * 1000 || u.data.availability === "offline";
    box.classList.remove("none");
    box.classList.toggle("stale", stale);
    setText(box.querySelector(".v-value"), valueText);
    setText(ageEl, (stale ? "STALE " : "") + fmtAge(ageMs));
  }

  function renderVitals(u) {
    const v = u.data.vitals;
    const r = (x) => (x ? [fmt(x.value), x.measured_at] : ["--", null]);
    const hr = r(v.heart_rate_bpm);
    setVital(u, "hr", hr[0], hr[1], staleAfterS);
    const sp = r(v.spo2_pct);
    setVital(u, "spo2", sp[0], sp[1], staleAfterS);
    const rr = r(v.resp_rate_per_min);
    setVital(u, "rr", rr[0], rr[1], staleAfterS);
    if (v.nibp) {
      setVital(u, "nibp", fmt(v.nibp.sbp_mmhg) + "/" + fmt(v.nibp.dbp_mmhg), v.nibp.measured_at, nibpStaleAfterS);
    } else {
      setVital(u, "nibp", "--", null, nibpStaleAfterS);
    }
  }

  function renderPosition(u) {
    const p = u.data.position;
    const el = u.el.querySelector(".position");
    el.classList.remove("none", "lost");
    if (!p.has_position) {
      el.classList.add("none");
      setText(el, "NO POSITION");
      return;
    }
    const where = Number(p.lat_deg).toFixed(4) + ", " + Number(p.lon_deg).toFixed(4);
    const age = fmtAge(serverNow() - parseT(p.fix_at));
    if (p.fix_lost) {
      el.classList.add("lost");
      setText(el, "GPS LOST - last known " + where + " (" + age + ")");
    } else {
      setText(el, "Position " + where + " (" + age + ")");
    }
  }

  function renderEta(u) {
    const a = primaryAlert(u);
    const etaEl = u.el.querySelector(".eta");
    const valueEl = u.el.querySelector(".eta-value");
    const clockEl2 = u.el.querySelector(".eta-clock");
    if (!a || !a.eta_at) { setText(valueEl, "unknown"); setText(clockEl2, ""); etaEl.classList.remove("due"); return; }
    const etaMs = parseT(a.eta_at);
    const left = Math.round((etaMs - serverNow()) / 1000);
    etaEl.classList.toggle("due", left <= 60);
    if (left <= 0) {
      setText(valueEl, left > -60 ? "ARRIVING" : "due " + Math.floor(-left / 60) + " min ago");
    } else {
      const m = Math.floor(left / 60), s = left % 60;
      setText(valueEl, m + ":" + String(s).padStart(2, "0"));
    }
    setText(clockEl2, "(" + new Date(etaMs).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) + ")");
  }

  // --- acknowledge ------------------------------------------------------------------------------------------

  async function acknowledge(u) {
    const a = primaryAlert(u);
    if (!a) return;
    const button = u.el.querySelector("button.ack");
    const state = u.el.querySelector(".ack-state");
    button.disabled = true;
    setText(state, "Sending...");
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), 8000);
    try {
      const res = await fetch("/api/alerts/" + encodeURIComponent(a.alert_id) + "/ack", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ hospital_id: HOSPITAL, by_role: "ed_staff" }),
        signal: ctrl.signal,
      });
      if (!res.ok) throw new Error("HTTP " + res.status);
      const alert = await res.json();
      u.data.alerts = u.data.alerts.map((x) => (x.alert_id === alert.alert_id ? alert : x));
      renderAlert(u);
    } catch (err) {
      button.disabled = false;
      state.classList.add("error");
      setText(state, "NOT DELIVERED - press again (" + (err && err.message ? err.message : "error") + ")");
    } finally {
      clearTimeout(timer);
    }
  }

  // --- ECG ----------------------------------------------------------------------------------------------------

  function addSegment(u, seg) {
    const t0 = parseT(seg.start_at);
    const s = { t0: t0, fs: seg.fs_hz, mv: seg.samples_mv, leadOff: seg.lead_off, lead: seg.lead };
    s.t1 = t0 + (1000 * s.mv.length) / s.fs;
    u.ecg.push(s);
    const keepFrom = s.t1 - (ecgWindowS + 2) * 1000;
    while (u.ecg.length > 1 && u.ecg[0].t1 < keepFrom) u.ecg.shift();
    u.headT = Math.max(u.headT || 0, s.t1);
    u.headLocal = performance.now();
    u.lastChunkMs = s.t1 - s.t0;
  }

  function drawEcg(u) {
    const canvas = u.el.querySelector("canvas.ecg");
    const dpr = window.devicePixelRatio || 1;
    const cssW = canvas.clientWidth, cssH = canvas.clientHeight;
    if (!cssW || !cssH) return;
    if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
      canvas.width = Math.round(cssW * dpr);
      canvas.height = Math.round(cssH * dpr);
    }
    const pxmm = CSS_PX_PER_MM * dpr;
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height;
    ctx.fillStyle = "#050607";
    ctx.fillRect(0, 0, W, H);
    // grid: 1 mm minor, 5 mm major
    for (let mm = 0, x = 0; x <= W; mm++, x = mm * pxmm) {
      ctx.fillStyle = mm % 5 === 0 ? "#3a1c1c" : "#1d1010";
      ctx.fillRect(Math.round(x), 0, 1, H);
    }
    for (let mm = 0, y = 0; y <= H; mm++, y = mm * pxmm) {
      ctx.fillStyle = mm % 5 === 0 ? "#3a1c1c" : "#1d1010";
      ctx.fillRect(0, Math.round(y), W, 1);
    }
    const baseY = H * 0.6;
    const yOf = (mv) => baseY - mv * MM_PER_MV * pxmm;
    // 1 mV calibration pulse, 200 ms wide
    const calX = 2 * pxmm, calW = 0.2 * MM_PER_S * pxmm;
    ctx.strokeStyle = "#9aa4b2";
    ctx.lineWidth = 1.5 * dpr;
    ctx.beginPath();
    ctx.moveTo(0, baseY); ctx.lineTo(calX, baseY); ctx.lineTo(calX, yOf(1)); ctx.lineTo(calX + calW, yOf(1));
    ctx.lineTo(calX + calW, baseY); ctx.lineTo(calX + calW + 2 * pxmm, baseY);
    ctx.stroke();

    const stateEl = u.el.querySelector(".ecg-state");
    const label = u.el.querySelector(".ecg-label");
    if (!u.ecg.length || u.headT === null) { setText(stateEl, "NO ECG"); setText(label, "25 mm/s  10 mm/mV"); return; }
    const last = u.ecg[u.ecg.length - 1];
    setText(label, "Lead " + last.lead + "  25 mm/s  10 mm/mV");
    const stale = serverNow() - last.t1 > Math.max(5000, 3 * u.lastChunkMs) || u.data.availability === "offline";
    setText(stateEl, last.leadOff ? "LEAD OFF" : stale ? "ECG SIGNAL LOST" : "");
    // Playback clock: runs one chunk behind the newest sample so the strip scrolls smoothly.
    const lag = (u.lastChunkMs || 1000) + 300;
    let playT = u.headT - lag + (performance.now() - u.headLocal);
    playT = Math.min(playT, u.headT);
    if (u.playT !== null && playT < u.playT && u.playT <= u.headT) playT = u.playT;
    u.playT = playT;
    const x0 = calX + calW + 3 * pxmm;
    const spanMs = ((W - x0) / pxmm / MM_PER_S) * 1000;
    const tStart = playT - spanMs;
    ctx.strokeStyle = "#39ff6a";
    ctx.lineWidth = 2 * dpr;
    ctx.beginPath();
    let pen = false, prevT = null;
    for (const s of u.ecg) {
      if (s.t1 < tStart || s.t0 > playT) continue;
      const dt = 1000 / s.fs;
      if (prevT !== null && s.t0 - prevT > 2.5 * dt) pen = false; // a gap stays a gap
      const i0 = Math.max(0, Math.floor((tStart - s.t0) / dt));
      const i1 = Math.min(s.mv.length, Math.ceil((playT - s.t0) / dt));
      for (let i = i0; i < i1; i++) {
        const t = s.t0 + i * dt;
        const x = x0 + ((t - tStart) / 1000) * MM_PER_S * pxmm;
        const y = yOf(s.mv[i]);
        if (pen) ctx.lineTo(x, y); else { ctx.moveTo(x, y); pen = true; }
      }
      prevT = s.t0 + (i1 - 1) * dt;
    }
    ctx.stroke();
  }

  let lastDraw = 0;
  function frame(ts) {
    if (ts - lastDraw > 33) {
      lastDraw = ts;
      units.forEach(drawEcg);
    }
    window.requestAnimationFrame(frame);
  }

  // --- feed ---------------------------------------------------------------------------------------------------

  function syncClock(serverTime) { if (serverTime) offsetMs = parseT(serverTime) - Date.now(); }

  function onSnapshot(snap) {
    syncClock(snap.server_time);
    staleAfterS = snap.stale_after_s;
    nibpStaleAfterS = snap.nibp_stale_after_s;
    ecgWindowS = snap.ecg_window_s;
    const keep = new Set(snap.cards.map((c) => c.unit_id));
    units.forEach((u, id) => { if (!keep.has(id)) { u.el.remove(); units.delete(id); } });
    snap.cards.forEach(setCard);
    reorder();
    tick();
  }

  const handlers = {
    snapshot: onSnapshot,
    alert: (ev) => { setCard(ev.card); reorder(); },
    removed: (ev) => { const u = units.get(ev.unit_id); if (u) { u.el.remove(); units.delete(ev.unit_id); } reorder(); },
    vitals: (ev) => { const u = units.get(ev.unit_id); if (u) { u.data.vitals = ev.vitals; renderVitals(u); } },
    position: (ev) => { const u = units.get(ev.unit_id); if (u) { u.data.position = ev.position; renderPosition(u); } },
    unit: (ev) => {
      const u = units.get(ev.unit_id);
      if (!u) return;
      u.data.availability = ev.availability;
      u.data.crew_status = ev.crew_status;
      renderUnitState(u);
      renderVitals(u);
    },
    ecg: (ev) => { const u = units.get(ev.unit_id); if (u) addSegment(u, ev.segment); },
  };

  function connect() {
    const source = new EventSource("/api/events?hospital=" + encodeURIComponent(HOSPITAL));
    source.onopen = () => { linkEl.className = "link link-up"; setText(linkEl, "LIVE"); };
    source.onerror = () => { linkEl.className = "link link-down"; setText(linkEl, "RECONNECTING - data may be old"); };
    Object.keys(handlers).forEach((name) => {
      source.addEventListener(name, (msg) => {
        let data;
        try { data = JSON.parse(msg.data); } catch (e) { return; }
        if (name !== "snapshot") syncClock(data.server_time);
        handlers[name](data);
      });
    });
  }

  function tick() {
    setText(clockEl, new Date(serverNow()).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" }));
    units.forEach((u) => { renderEta(u); renderVitals(u); renderPosition(u); });
  }

  reorder();
  connect();
  setInterval(tick, 500);
  window.requestAnimationFrame(frame);
})();
