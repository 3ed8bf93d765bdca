// GoldenHour patient detail: live ECG (every lead, clinical scale), vitals trends since first contact, the route on a
// map drawn from the local OSM extract, team activations with acknowledgement, the case timeline.
// Honest data: gaps are holes (ECG strip and trends), never interpolated; every value shows its age; a unit without
// a fix is "no position" and is never drawn (FF-15). Text only through textContent (FF-16).
"use strict";

(function () {
  const G = window.GH;
  const HOSPITAL = document.body.dataset.hospital;
  const UNIT = document.body.dataset.unit;
  const PXMM = G.pxPerMm();
  const q = (id) => document.getElementById(id);

  let limits = { stale: 10, nibp: 300, gps: 30, ecgWindow: 10, trendStep: 2 };
  let card = null, cardT = null, vitalsT = null;
  let strip = G.newStrip();
  let trend = [];
  let trail = [];
  let gaps = [];
  let timeline = [];
  let dispatchTimeline = [];
  let lead = 0; // index into the chunk's leads; -1 = all leads
  let route = null;
  let roads = null, roadsKey = null;
  let posRef = null;

  q("back").href = "/?hospital=" + encodeURIComponent(HOSPITAL);

  function alertOf() { return card && card.alerts.length ? card.alerts[0] : null; }

  // --- header, teams -----------------------------------------------------------------------------------------
  function renderCard() {
    const a = alertOf();
    const banner = q("banner");
    banner.classList.remove("prio-high", "prio-medium", "prio-low");
    if (a) {
      banner.classList.add("prio-" + a.priority);
      G.setText(banner.querySelector(".prio-text"), G.PRIO_TEXT[a.priority] || a.priority);
      G.setText(q("case-type"), G.CASE_TEXT[a.case_type] || a.case_type);
      G.setText(q("patient"), G.ageBand(a.age_years) + ", " + a.sex);
      G.setText(q("note"), a.note || "");
      G.renderActivations(q("acts"), a, cardT, (dept, b) => ack(dept, b));
      const acked = a.state === "acknowledged";
      q("ack-all").classList.toggle("hidden", acked);
      q("ack-all").disabled = false;
      const st = q("ack-state");
      st.classList.toggle("done", acked);
      G.setText(st, acked ? "ACKNOWLEDGED" + (a.acknowledged_by ? " by " + a.acknowledged_by : "") :
        a.state === "escalated" ? "ESCALATED - not yet acknowledged" : "Not acknowledged");
    }
    const avail = q("availability");
    avail.classList.toggle("offline", card.availability === "offline");
    G.setText(avail, card.availability === "offline" ? "OFFLINE - link lost" : card.availability === "online" ? "online" : "");
    G.setText(q("crew-status"), card.crew_status ? G.STATUS_TEXT[card.crew_status] || card.crew_status : "");
    renderVitals();
    renderPosition();
  }

  function renderVitals() {
    G.renderVitals(document, card.vitals, vitalsT || cardT, limits, card.availability === "offline");
  }

  function renderPosition() {
    const p = card.position;
    posRef = p.has_position ? G.refOf(p.age_s, cardT) : null;
  }

  async function ack(department, button) {
    const a = alertOf();
    if (!a) return;
    const b = button || q("ack-all");
    b.disabled = true;
    G.setText(q("ack-state"), "Sending...");
    try {
      const alert = await G.postAck(HOSPITAL, a.alert_id, department, "ed_staff");
      card.alerts = card.alerts.map((x) => (x.alert_id === alert.alert_id ? alert : x));
      renderCard();
    } catch (err) {
      b.disabled = false;
      q("ack-state").classList.add("error");
      G.setText(q("ack-state"), "NOT DELIVERED - press again (" + (err && err.message ? err.message : "error") + ")");
    }
  }
  q("ack-all").addEventListener("click", () => ack(null, null));

  function renderEta() {
    const a = alertOf();
    const now = G.serverNow();
    if (!a || !a.eta_at || now === null) { G.setText(q("eta-value"), "unknown"); G.setText(q("eta-clock"), ""); return; }
    const eta = G.parseT(a.eta_at);
    const left = Math.round((eta - now) / 1000);
    G.setText(q("eta-value"), left <= 0 ? "ARRIVING" : G.fmtCountdown(left));
    G.setText(q("eta-clock"), "(" + G.fmtClock(eta) + ")");
  }

  // --- ECG -------------------------------------------------------------------------------------------------
  function renderLeadButtons() {
    const leads = G.stripLeads(strip);
    const box = q("leads");
    const want = leads.join(",") + "|" + lead;
    if (box.dataset.want === want) return;
    box.dataset.want = want;
    box.replaceChildren();
    const add = (text, index) => {
      const b = G.el("button", index === lead ? "on" : "", text);
      b.type = "button";
      b.dataset.lead = String(index);
      b.addEventListener("click", () => { lead = index; renderLeadButtons(); buildStrips(); });
      box.appendChild(b);
    };
    leads.forEach((name, i) => add(name, i));
    if (leads.length > 1) add("All", -1);
    buildStrips();
  }

  function buildStrips() {
    const wrap = q("ecg-strips");
    const leads = G.stripLeads(strip);
    const show = lead === -1 ? leads.map((_, i) => i) : [Math.min(lead, Math.max(0, leads.length - 1))];
    const want = show.join(",");
    if (wrap.dataset.want === want) return;
    wrap.dataset.want = want;
    wrap.classList.toggle("multi", show.length > 1);
    wrap.replaceChildren();
    show.forEach((i) => {
      const w = G.el("div", "ecg-wrap");
      const c = G.el("canvas", "ecg");
      c.dataset.lead = String(i);
      w.appendChild(c);
      w.appendChild(G.el("span", "ecg-label"));
      w.appendChild(G.el("span", "ecg-state"));
      wrap.appendChild(w);
    });
  }

  // One animation-frame loop for every lead shown; each strip draws only what was played since the last frame.
  function frame() {
    const leads = G.stripLeads(strip);
    q("ecg-strips").querySelectorAll(".ecg-wrap").forEach((w) => {
      const c = w.querySelector("canvas");
      const i = Number(c.dataset.lead);
      G.drawStrip(c, strip, i, { pxPerMm: PXMM });
      G.setText(w.querySelector(".ecg-label"), leads.length ? "Lead " + leads[Math.min(i, leads.length - 1)] : "");
      G.setText(w.querySelector(".ecg-state"), G.stripState(strip, i, card && card.ecg_lost, card && card.availability === "offline"));
    });
    window.requestAnimationFrame(frame);
  }

  // --- trends (small canvas charts; holes where data is missing, never interpolated) -----------------------
  function drawTrend(canvas, series, yMin, yMax) {
    const dpr = window.devicePixelRatio || 1;
    const W = Math.round(canvas.clientWidth * dpr), H = Math.round(canvas.clientHeight * dpr);
    if (!W || !H) return;
    if (canvas.width !== W || canvas.height !== H) { canvas.width = W; canvas.height = H; }
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#0f1216";
    ctx.fillRect(0, 0, W, H);
    const padL = 40 * dpr, padR = 8 * dpr, padT = 20 * dpr, padB = 18 * dpr;
    const times = trend.map((p) => G.parseT(p.at));
    if (!times.length) {
      ctx.fillStyle = "#6b7380"; ctx.font = Math.round(14 * dpr) + "px sans-serif";
      ctx.fillText("no data yet", padL, H / 2);
      return;
    }
    const t0 = times[0], t1 = Math.max(times[times.length - 1], t0 + 60000);
    const xOf = (t) => padL + ((t - t0) / (t1 - t0)) * (W - padL - padR);
    const yOf = (v) => H - padB - ((v - yMin) / (yMax - yMin)) * (H - padT - padB);
    ctx.strokeStyle = "#2a313b"; ctx.lineWidth = 1; ctx.fillStyle = "#a9b2bf";
    ctx.font = Math.round(11 * dpr) + "px sans-serif";
    [yMin, (yMin + yMax) / 2, yMax].forEach((v) => {
      ctx.beginPath(); ctx.moveTo(padL, yOf(v)); ctx.lineTo(W - padR, yOf(v)); ctx.stroke();
      ctx.fillText(String(Math.round(v)), 4 * dpr, yOf(v) + 4 * dpr);
    });
    const mins = Math.round((t1 - t0) / 60000);
    ctx.fillText("-" + mins + " min", padL, H - 4 * dpr);
    ctx.fillText("latest", W - padR - 40 * dpr, H - 4 * dpr);
    const maxStep = Math.max(3 * limits.trendStep, 10) * 1000;
    series.forEach(([key, color]) => {
      ctx.strokeStyle = color; ctx.lineWidth = 2 * dpr; ctx.beginPath();
      let pen = false, prevT = null;
      trend.forEach((p, i) => {
        const v = p[key];
        const t = times[i];
        if (v === null || v === undefined || (prevT !== null && t - prevT > maxStep)) pen = false;
        if (v !== null && v !== undefined) {
          const x = xOf(t), y = yOf(Math.min(yMax, Math.max(yMin, v)));
          if (pen) ctx.lineTo(x, y); else { ctx.moveTo(x, y); ctx.fillStyle = color; ctx.fillRect(x - dpr, y - dpr, 2 * dpr, 2 * dpr); pen = true; }
        }
        prevT = t;
      });
      ctx.stroke();
    });
  }

  function drawTrends() {
    drawTrend(q("trend-hr"), [["heart_rate_bpm", "#39ff6a"]], 30, 180);
    drawTrend(q("trend-spo2"), [["spo2_pct", "#32d4f5"]], 70, 100);
    drawTrend(q("trend-bp"), [["sbp_mmhg", "#ff9f0a"], ["dbp_mmhg", "#ffd60a"]], 30, 200);
    drawTrend(q("trend-rr"), [["resp_rate_per_min", "#f2f4f7"]], 0, 40);
  }

  // --- map -----------------------------------------------------------------------------------------------------
  function validPos(lat, lon) {
    return typeof lat === "number" && typeof lon === "number" && isFinite(lat) && isFinite(lon) &&
      Math.abs(lat) <= 90 && Math.abs(lon) <= 180 && !(lat === 0 && lon === 0);
  }

  function mapBox() {
    const pts = [];
    const p = card && card.position;
    if (p && p.has_position && validPos(p.lat_deg, p.lon_deg)) pts.push([p.lat_deg, p.lon_deg]);
    if (route) { pts.push(route.to_deg); route.points_deg.forEach((x) => pts.push(x)); }
    trail.forEach((x) => { if (validPos(x.lat_deg, x.lon_deg)) pts.push([x.lat_deg, x.lon_deg]); });
    if (!pts.length) return null;
    let s = Infinity, w = Infinity, n = -Infinity, e = -Infinity;
    pts.forEach(([a, b]) => { s = Math.min(s, a); n = Math.max(n, a); w = Math.min(w, b); e = Math.max(e, b); });
    const padLat = Math.max(0.004, (n - s) * 0.15), padLon = Math.max(0.006, (e - w) * 0.15);
    // round outwards to 0.005 deg so small moves reuse the same road query
    const r = (v, up) => (up ? Math.ceil(v / 0.005) : Math.floor(v / 0.005)) * 0.005;
    return [r(s - padLat, false), r(w - padLon, false), r(n + padLat, true), r(e + padLon, true)];
  }

  async function loadRoads(box) {
    const key = box.map((v) => v.toFixed(3)).join(",");
    if (key === roadsKey) return;
    roadsKey = key;
    try {
      const res = await fetch("/api/map/roads?bbox=" + encodeURIComponent(key));
      if (!res.ok) throw new Error("HTTP " + res.status);
      roads = await res.json();
    } catch (e) {
      roads = null;
    }
  }

  async function loadRoute() {
    try {
      const res = await fetch("/api/units/" + encodeURIComponent(UNIT) + "/route?hospital=" + encodeURIComponent(HOSPITAL));
      if (res.status === 409) { route = null; G.setText(q("route-info"), "No position: route unknown"); return; }
      if (!res.ok) throw new Error("HTTP " + res.status);
      route = await res.json();
      G.setText(q("route-info"), "By road " + (route.distance_m / 1000).toFixed(1) + " km, " +
        G.fmtCountdown(route.duration_s) + " driving (dispatch router)");
    } catch (e) {
      G.setText(q("route-info"), "Route unavailable (" + (e && e.message ? e.message : "error") + ")");
    }
  }

  function drawMap() {
    const canvas = q("map");
    const dpr = window.devicePixelRatio || 1;
    const W = Math.round(canvas.clientWidth * dpr), H = Math.round(canvas.clientHeight * dpr);
    if (!W || !H) return;
    if (canvas.width !== W || canvas.height !== H) { canvas.width = W; canvas.height = H; }
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#0f1216";
    ctx.fillRect(0, 0, W, H);
    const box = mapBox();
    const p = card && card.position;
    const hasPos = !!(p && p.has_position && validPos(p.lat_deg, p.lon_deg));
    G.setText(q("map-state"), hasPos ? "" : "NO POSITION");
    if (!box) return;
    loadRoads(box);
    const [s, w, n, e] = box;
    const k = Math.cos(((s + n) / 2) * Math.PI / 180);
    const spanX = (e - w) * k, spanY = n - s;
    const scale = Math.min(W / spanX, H / spanY);
    const ox = (W - spanX * scale) / 2, oy = (H - spanY * scale) / 2;
    const X = (lon) => ox + (lon - w) * k * scale;
    const Y = (lat) => H - oy - (lat - s) * scale;
    if (roads && roads.ways) {
      const style = { major: ["#5b6472", 3], secondary: ["#454c57", 2], minor: ["#30363f", 1] };
      roads.ways.forEach((way) => {
        const st = style[way.kind] || style.minor;
        ctx.strokeStyle = st[0]; ctx.lineWidth = st[1] * dpr; ctx.beginPath();
        way.points.forEach(([la, lo], i) => (i ? ctx.lineTo(X(lo), Y(la)) : ctx.moveTo(X(lo), Y(la))));
        ctx.stroke();
      });
    }
    if (route && route.points_deg.length > 1) {
      ctx.strokeStyle = "#32d4f5"; ctx.lineWidth = 5 * dpr; ctx.beginPath();
      route.points_deg.forEach(([la, lo], i) => (i ? ctx.lineTo(X(lo), Y(la)) : ctx.moveTo(X(lo), Y(la))));
      ctx.stroke();
    }
    if (trail.length > 1) {
      ctx.strokeStyle = "#a9b2bf"; ctx.setLineDash([4 * dpr, 4 * dpr]); ctx.lineWidth = 2 * dpr; ctx.beginPath();
      trail.forEach((pt, i) => (i ? ctx.lineTo(X(pt.lon_deg), Y(pt.lat_deg)) : ctx.moveTo(X(pt.lon_deg), Y(pt.lat_deg))));
      ctx.stroke(); ctx.setLineDash([]);
    }
    if (route) {
      const hx = X(route.to_deg[1]), hy = Y(route.to_deg[0]), r = 10 * dpr;
      ctx.fillStyle = "#f2f4f7"; ctx.fillRect(hx - r, hy - r, 2 * r, 2 * r);
      ctx.fillStyle = "#c00"; ctx.font = "bold " + Math.round(16 * dpr) + "px sans-serif"; ctx.fillText("H", hx - 6 * dpr, hy + 6 * dpr);
    }
    if (hasPos) {
      const age = G.ageSince(posRef);
      const old = p.fix_lost || (age !== null && age > limits.gps);
      const ux = X(p.lon_deg), uy = Y(p.lat_deg), r = 11 * dpr;
      ctx.fillStyle = old ? "#6b7380" : "#ff3b30";
      ctx.beginPath(); ctx.arc(ux, uy, r, 0, 2 * Math.PI); ctx.fill();
      ctx.strokeStyle = "#fff"; ctx.lineWidth = 2 * dpr; ctx.stroke();
      ctx.fillStyle = old ? "#ffd60a" : "#f2f4f7"; ctx.font = Math.round(14 * dpr) + "px sans-serif";
      ctx.fillText((p.fix_lost ? "GPS LOST, last known " : "") + G.fmtAge(age), ux + 14 * dpr, uy - 10 * dpr);
    }
  }

  // --- timeline and gaps ---------------------------------------------------------------------------------------
  function renderTimeline() {
    const all = timeline.concat(dispatchTimeline);
    const seen = new Set();
    const rows = all.filter((e) => { const k = e.at + "|" + e.kind; if (seen.has(k)) return false; seen.add(k); return true; })
      .sort((a, b) => G.parseT(a.at) - G.parseT(b.at));
    const ol = q("timeline");
    ol.replaceChildren();
    rows.forEach((e) => {
      const li = G.el("li");
      li.appendChild(G.el("span", "tl-at", G.fmtClock(G.parseT(e.at), true)));
      li.appendChild(document.createTextNode(e.kind + (e.detail ? " - " + e.detail : "")));
      li.appendChild(G.el("span", "tl-src", e.source));
      ol.appendChild(li);
    });
    const restarts = gaps.filter((g) => g.restart).length;
    const holes = gaps.filter((g) => !g.restart);
    const ecgGaps = holes.filter((g) => g.stream === "ecg");
    const other = holes.length - ecgGaps.length;
    const parts = [];
    if (holes.length) {
      parts.push("Data gaps: " + ecgGaps.length + " in ECG" + (other ? ", " + other + " in vitals/GPS" : "") +
        " (shown as holes, never interpolated)");
    }
    // a unit whose outbox was replaced starts new sequence numbers: what was lost before it is unknown, not counted
    if (restarts) parts.push("Sequence restarted " + restarts + "x (data lost before it: unknown)");
    G.setText(q("gaps"), parts.join(" · "));
  }

  async function loadTimeline() {
    try {
      const res = await fetch("/api/units/" + encodeURIComponent(UNIT) + "/timeline?hospital=" + encodeURIComponent(HOSPITAL));
      if (!res.ok) return;
      const data = await res.json();
      dispatchTimeline = data.entries.filter((e) => e.source.startsWith("dispatch/"));
      renderTimeline();
    } catch (e) { /* dispatch optional: the board's own timeline stays */ }
  }

  // --- feed ------------------------------------------------------------------------------------------------------
  function onDetail(d) {
    limits = {
      stale: d.stale_after_s, nibp: d.nibp_stale_after_s, gps: d.gps_stale_after_s, ecgWindow: d.ecg_window_s,
      trendStep: d.trend_step_s,
    };
    q("gone").classList.add("hidden");
    card = d.card; cardT = d.server_time; vitalsT = d.server_time;
    strip = G.newStrip();
    d.ecg_leads.forEach((s) => G.addSegment(strip, s, limits.ecgWindow));
    trend = d.trend; trail = d.trail; gaps = d.gaps; timeline = d.timeline;
    renderCard(); renderLeadButtons(); renderTimeline(); drawTrends();
    loadRoute(); loadTimeline();
  }

  const handlers = {
    detail: onDetail,
    tick: () => {},
    alert: (ev) => { if (ev.card.unit_id === UNIT) { card = ev.card; cardT = ev.server_time; vitalsT = ev.server_time; renderCard(); } },
    removed: () => { q("gone").classList.remove("hidden"); G.renderLink(q("link"), "gone"); },
    vitals: (ev) => { if (card) { card.vitals = ev.vitals; vitalsT = ev.server_time; renderVitals(); } },
    position: (ev) => { if (card) { card.position = ev.position; cardT = ev.server_time; renderPosition(); } },
    unit: (ev) => {
      if (!card) return;
      card.availability = ev.availability; card.crew_status = ev.crew_status; card.ecg_lost = ev.ecg_lost;
      renderCard();
    },
    ecg_leads: (ev) => { G.addSegment(strip, ev.segment, limits.ecgWindow); if (card) card.ecg_lost = false; renderLeadButtons(); },
    trend: (ev) => { trend.push(ev.point); trend.sort((a, b) => G.parseT(a.at) - G.parseT(b.at)); drawTrends(); },
    trail: (ev) => { trail.push(ev.point); if (trail.length > 3600) trail.shift(); },
    gap: (ev) => { gaps.push(ev.gap); renderTimeline(); },
    timeline: (ev) => { timeline.push(ev.entry); renderTimeline(); },
  };

  function tick() {
    const now = G.serverNow();
    G.setText(q("clock"), now === null ? "--:--" : G.fmtClock(now, true));
    if (!card) return;
    renderEta();
    document.querySelectorAll(".vital").forEach(G.tickVital);
    G.tickActivations(q("acts"));
    drawMap();
  }

  G.connectFeed("/api/events?hospital=" + encodeURIComponent(HOSPITAL) + "&unit=" + encodeURIComponent(UNIT), handlers,
    (s) => G.renderLink(q("link"), s), 8000);
  setInterval(tick, 500);
  setInterval(() => { if (card) { drawTrends(); loadRoute(); } }, 15000);
  setInterval(() => { if (card) loadTimeline(); }, 30000);
  window.requestAnimationFrame(frame);
})();
