// GoldenHour dispatcher console: a canvas map of the road network, units, incidents and hospitals; incident
// creation by clicking the map; unit and destination recommendations with reasons; one-action assignment; the
// case timeline.  Polls the dispatch API every POLL_MS.  Every name or free text goes into the page through
// textContent (or canvas fillText), never as HTML (FF-16); a unit without a position is listed, never drawn at
// (0, 0) (FF-05, FF-15).  No external resources: it works offline.
"use strict";
(() => {
  const POLL_MS = 2000;
  const state = {
    roads: null, hospitals: [], units: [], incidents: [], alerts: [], selected: null, recommendation: null,
    timeline: null, draft: null, view: null, roadLayer: null, polls: 0, lastOk: null,
  };
  const $ = (id) => document.getElementById(id);
  const canvas = $("map");

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  async function api(method, path, body) {
    const init = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    if (resp.status === 401) {
      // no or expired session: the HttpOnly cookie is renewed at /api/auth/refresh, else sign in again
      const renewed = await fetch("/api/auth/refresh", { method: "POST" });
      if (renewed.ok) return api(method, path, body);
      location.href = "/login?next=" + encodeURIComponent(location.pathname);
      throw new Error("sign-in required");
    }
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      const detail = data && data.detail;
      let message = `HTTP ${resp.status}`;
      if (typeof detail === "string") message = detail;
      else if (detail && detail.message) message = `${detail.message}: ${(detail.violations || []).join("; ")}`;
      else if (Array.isArray(detail)) message = detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
      const err = new Error(message);
      err.status = resp.status;
      throw err;
    }
    return data;
  }

  // --- map projection ---------------------------------------------------------------------------------------------

  function fitView() {
    const rect = canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(rect.width * dpr));
    canvas.height = Math.max(1, Math.round(rect.height * dpr));
    if (!state.roads) return;
    const r = state.roads;
    const kx = Math.cos(((r.min_lat_deg + r.max_lat_deg) / 2) * Math.PI / 180);
    const pad = 20 * dpr;
    const spanX = Math.max(1e-9, (r.max_lon_deg - r.min_lon_deg) * kx);
    const spanY = Math.max(1e-9, r.max_lat_deg - r.min_lat_deg);
    const scale = Math.min((canvas.width - 2 * pad) / spanX, (canvas.height - 2 * pad) / spanY);
    const offX = (canvas.width - spanX * scale) / 2;
    const offY = (canvas.height - spanY * scale) / 2;
    state.view = { kx, scale, offX, offY, dpr, r };
    state.roadLayer = null;
  }

  function toCanvas(lat, lon) {
    const v = state.view;
    return [v.offX + (lon - v.r.min_lon_deg) * v.kx * v.scale, v.offY + (v.r.max_lat_deg - lat) * v.scale];
  }

  function toPixel(lat, lon) { // CSS pixels relative to the viewport (for tests and tooltips)
    const [x, y] = toCanvas(lat, lon);
    const rect = canvas.getBoundingClientRect();
    return { x: rect.left + x / state.view.dpr, y: rect.top + y / state.view.dpr };
  }

  function fromCanvas(x, y) {
    const v = state.view;
    return [v.r.max_lat_deg - (y - v.offY) / v.scale, v.r.min_lon_deg + (x - v.offX) / (v.kx * v.scale)];
  }

  function hasPosition(u) {
    return u.lat_deg !== null && u.lon_deg !== null && Number.isFinite(u.lat_deg) && Number.isFinite(u.lon_deg)
      && !(u.lat_deg === 0 && u.lon_deg === 0);
  }

  function drawRoads() {
    const layer = document.createElement("canvas");
    layer.width = canvas.width;
    layer.height = canvas.height;
    const ctx = layer.getContext("2d");
    ctx.strokeStyle = "#3a4654";
    ctx.lineWidth = 1 * state.view.dpr;
    ctx.beginPath();
    for (const line of state.roads.polylines) {
      line.forEach(([lat, lon], i) => {
        const [x, y] = toCanvas(lat, lon);
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
    }
    ctx.stroke();
    state.roadLayer = layer;
  }

  function label(ctx, text, x, y, color) {
    ctx.fillStyle = color;
    ctx.fillText(String(text), x + 8 * state.view.dpr, y - 6 * state.view.dpr);
  }

  function draw() {
    if (!state.view) return;
    const ctx = canvas.getContext("2d");
    const dpr = state.view.dpr;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!state.roadLayer) drawRoads();
    ctx.drawImage(state.roadLayer, 0, 0);
    ctx.font = `${12 * dpr}px system-ui, sans-serif`;
    for (const h of state.hospitals) {
      const [x, y] = toCanvas(h.lat_deg, h.lon_deg);
      ctx.strokeStyle = "#ff7b72";
      ctx.lineWidth = 3 * dpr;
      ctx.beginPath();
      ctx.moveTo(x - 7 * dpr, y); ctx.lineTo(x + 7 * dpr, y); ctx.moveTo(x, y - 7 * dpr); ctx.lineTo(x, y + 7 * dpr);
      ctx.stroke();
      const name = String(h.name || h.hospital_id);
      const w = ctx.measureText(name).width;
      ctx.fillStyle = "#ffb3ad";
      ctx.fillText(name, Math.min(x + 8 * dpr, canvas.width - w - 4 * dpr), y - 6 * dpr);
    }
    for (const i of state.incidents) {
      if (i.state === "closed" || i.state === "cancelled") continue;
      const [x, y] = toCanvas(i.lat_deg, i.lon_deg);
      const selected = state.selected === i.incident_id;
      ctx.fillStyle = "#ff4d4f";
      ctx.beginPath();
      const s = (selected ? 11 : 8) * dpr;
      ctx.moveTo(x, y - s); ctx.lineTo(x + s, y + s * 0.8); ctx.lineTo(x - s, y + s * 0.8); ctx.closePath();
      ctx.fill();
      if (selected) { ctx.strokeStyle = "#ffffff"; ctx.lineWidth = 2 * dpr; ctx.stroke(); }
      ctx.fillStyle = "#ffa39e";
      ctx.fillText(String(i.incident_id), x - 30 * dpr, y + 26 * dpr);
    }
    for (const u of state.units) {
      if (!hasPosition(u)) continue;
      const [x, y] = toCanvas(u.lat_deg, u.lon_deg);
      const color = u.available ? "#3fb950" : "#f0883e";
      ctx.beginPath();
      ctx.arc(x, y, 6 * dpr, 0, 2 * Math.PI);
      if (u.gps_fix) { ctx.fillStyle = color; ctx.fill(); } else { ctx.strokeStyle = "#8b98a5"; ctx.lineWidth = 2 * dpr; ctx.stroke(); }
      label(ctx, u.unit_id + (u.gps_fix ? "" : " (last known)"), x, y, u.gps_fix ? color : "#8b98a5");
    }
    if (state.draft) {
      const [x, y] = toCanvas(state.draft[0], state.draft[1]);
      ctx.strokeStyle = "#f0b429"; ctx.lineWidth = 2 * dpr;
      ctx.beginPath(); ctx.arc(x, y, 10 * dpr, 0, 2 * Math.PI); ctx.stroke();
    }
  }

  // --- panels -----------------------------------------------------------------------------------------------------

  function fmtEta(s) {
    if (s === null || s === undefined) return "ETA unknown";
    const m = Math.floor(s / 60);
    return `${m} min ${String(Math.round(s % 60)).padStart(2, "0")} s`;
  }

  function renderUnits() {
    const list = $("units");
    const nopos = $("units-nopos");
    list.replaceChildren();
    nopos.replaceChildren();
    for (const u of state.units) {
      const stage = u.lifecycle || u.status || "unknown";
      const li = el("li");
      li.dataset.unit = u.unit_id;
      li.append(el("strong", u.unit_id), el("span", ` ${stage}`), el("span", u.available ? " · available" : "", "ok"));
      if (u.current_incident_id) li.append(el("span", ` · ${u.current_incident_id}`, "reasons"));
      if (hasPosition(u)) {
        if (!u.gps_fix) li.append(el("span", " · no fix, last known position", "reasons"));
        list.append(li);
      } else {
        li.append(el("span", " · no position", "reasons"));
        nopos.append(li);
      }
    }
  }

  const ALERTS_SHOWN = 12;
  const ACTIVE_ALERT = new Set(["sent", "on_board", "acknowledged", "escalated"]); // every state but cancelled

  function clockOf(iso) { return iso ? iso.replace("T", " ").slice(11, 19) : ""; }

  function countdown(iso) {
    const s = Math.round((Date.parse(iso) - Date.now()) / 1000);
    if (s <= 0) return "now";
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  // One line per receiving department: a page nobody has acknowledged is the dispatcher's problem, so it says
  // who is being paged and when it escalates next; an acknowledgement says when and by which role.
  function activationLine(a) {
    const dept = a.department.replace(/_/g, " ");
    if (a.state === "acknowledged") {
      return el("li", `✓ ${dept}: acknowledged ${clockOf(a.acknowledged_at)}${a.acknowledged_by_role ? " by " + a.acknowledged_by_role : ""}`, "ack ok");
    }
    if (a.state === "cancelled") return el("li", `– ${dept}: stood down`, "ack reasons");
    const escalated = a.state === "escalated";
    const next = a.escalate_at ? ` · escalates in ${countdown(a.escalate_at)}` : "";
    return el("li", `${escalated ? "⚠" : "…"} ${dept}: ${escalated ? "ESCALATED, paging " : "paged, "}${a.level}${next}`,
      escalated ? "ack miss" : "ack");
  }

  function renderAlerts() {
    const list = $("alerts");
    list.replaceChildren();
    const shown = state.alerts.filter((a) => ACTIVE_ALERT.has(a.state)).slice(0, ALERTS_SHOWN);
    if (shown.length === 0) list.append(el("li", "no open pre-alert", "reasons"));
    for (const a of shown) {
      const li = el("li");
      li.dataset.alert = a.alert_id;
      li.dataset.state = a.state;
      const eta = a.eta_at ? ` · ETA ${clockOf(a.eta_at)}` : "";
      li.append(el("strong", `${a.unit_id} → ${a.hospital_name || a.hospital_id}`),
        el("span", ` ${a.case_type} · ${a.priority} · ${a.state}${a.historical ? " (delayed)" : ""}`, "badge"),
        el("span", eta, "reasons"));
      const acts = el("ul", null, "acts");
      for (const act of a.activations || []) acts.append(activationLine(act));
      if ((a.activations || []).length === 0) acts.append(el("li", `no department paged · sent ${clockOf(a.created_at)}`, "ack reasons"));
      li.append(acts);
      list.append(li);
    }
  }

  function renderIncidents() {
    const list = $("incidents");
    list.replaceChildren();
    for (const i of state.incidents) {
      const li = el("li");
      li.dataset.incident = i.incident_id;
      if (state.selected === i.incident_id) li.classList.add("selected");
      li.append(el("strong", i.incident_id), el("span", ` ${i.priority} · ${i.state} `, "badge"), el("span", ` ${i.complaint}`));
      if (i.unit_id) li.append(el("span", ` → ${i.unit_id}`, "reasons"));
      li.addEventListener("click", () => select(i.incident_id));
      list.append(li);
    }
  }

  function renderDetail() {
    const panel = $("detail");
    const inc = state.incidents.find((i) => i.incident_id === state.selected);
    if (!inc) { panel.hidden = true; return; }
    panel.hidden = false;
    $("d-id").textContent = inc.incident_id;
    $("d-state").textContent = inc.state + (inc.unit_id ? ` · ${inc.unit_id}` : "");
    $("d-complaint").textContent = inc.complaint;
    $("d-notes").textContent = inc.caller_notes;
    const open = inc.state === "open" || inc.state === "assigned";
    $("cancel-incident").disabled = !open;
    const rec = state.recommendation && state.recommendation.incident_id === inc.incident_id ? state.recommendation : null;
    $("assign-best").disabled = !(open && rec && rec.units.length > 0);
    const units = $("rec-units");
    units.replaceChildren();
    if (rec) {
      if (rec.units.length === 0) units.append(el("li", "no available unit", "reasons"));
      for (const r of rec.units) {
        const li = el("li");
        li.dataset.unit = r.unit_id;
        const btn = el("button", "Assign");
        btn.type = "button";
        btn.className = "secondary assign";
        btn.disabled = !open;
        btn.addEventListener("click", () => assign(r.unit_id));
        li.append(el("strong", `${r.rank}. ${r.unit_id}`), el("span", ` ${fmtEta(r.eta_s)} `), btn,
          el("div", r.reasons.join(" · "), "reasons"));
        units.append(li);
      }
    }
    const dest = $("rec-dest");
    dest.replaceChildren();
    if (rec) {
      for (const d of rec.destinations.slice(0, 3)) {
        const li = el("li");
        li.append(el("strong", d.hospital_name || d.hospital_id), el("span", ` ${fmtEta(d.eta_s)}`),
          el("div", d.reasons.join(" · "), "reasons"));
        dest.append(li);
      }
    }
    const body = $("timeline").querySelector("tbody");
    body.replaceChildren();
    const ivs = $("intervals");
    ivs.replaceChildren();
    const tl = state.timeline && state.timeline.case_id === inc.incident_id ? state.timeline : null;
    if (tl) {
      for (const e of tl.events) {
        const tr = el("tr");
        tr.dataset.point = e.point;
        tr.append(el("td", e.at.replace("T", " ").slice(0, 19)), el("td", e.point), el("td", e.nemsis || ""),
          el("td", e.source), el("td", e.flags.join("; "), "flag"));
        body.append(tr);
      }
      for (const iv of tl.intervals) {
        const text = iv.seconds === null ? "—" : `${(iv.seconds / 60).toFixed(1)} min`;
        const li = el("li");
        li.append(el("span", `${iv.name}: ${text} (target ${iv.target_s / 60} min) `),
          el("span", iv.compliant === null ? "" : iv.compliant ? "met" : "missed", iv.compliant ? "ok" : "miss"));
        ivs.append(li);
      }
    }
  }

  function render() {
    renderUnits();
    renderAlerts();
    renderIncidents();
    renderDetail();
    draw();
  }

  // --- actions ----------------------------------------------------------------------------------------------------

  async function refreshSelected() {
    const inc = state.incidents.find((i) => i.incident_id === state.selected);
    if (!inc) return;
    const jobs = [api("GET", `/api/cases/${encodeURIComponent(inc.incident_id)}/timeline`).then((t) => { state.timeline = t; })];
    if (inc.state === "open" || inc.state === "assigned") {
      jobs.push(api("GET", `/api/incidents/${encodeURIComponent(inc.incident_id)}/recommend-units`)
        .then((r) => { state.recommendation = r; }));
    }
    await Promise.all(jobs);
  }

  async function poll() {
    try {
      const [units, incidents, alerts] = await Promise.all(
        [api("GET", "/api/units"), api("GET", "/api/incidents"), api("GET", "/api/alerts")]);
      state.units = units;
      state.incidents = incidents;
      state.alerts = alerts;
      await refreshSelected();
      state.polls += 1;
      state.lastOk = new Date();
      $("link").textContent = "LIVE";
      $("link").className = "link live";
    } catch (e) {
      $("link").textContent = "NO CONNECTION";
      $("link").className = "link down";
    }
    render();
  }

  async function select(id) {
    state.selected = id;
    state.recommendation = null;
    state.timeline = null;
    $("d-error").textContent = "";
    render();
    try { await refreshSelected(); } catch (e) { $("d-error").textContent = e.message; }
    render();
  }

  async function assign(unitId) {
    const id = state.selected;
    $("d-error").textContent = "";
    try {
      const result = await api("POST", `/api/incidents/${encodeURIComponent(id)}/assign`, { unit_id: unitId });
      if (!result.notice_confirmed) $("d-error").textContent = "assigned, but the unit's notice is not confirmed yet";
    } catch (e) {
      $("d-error").textContent = e.message;
    }
    await poll();
  }

  $("assign-best").addEventListener("click", () => {
    const rec = state.recommendation;
    if (rec && rec.units.length > 0) assign(rec.units[0].unit_id);
  });

  $("cancel-incident").addEventListener("click", async () => {
    $("d-error").textContent = "";
    try { await api("POST", `/api/incidents/${encodeURIComponent(state.selected)}/cancel`, {}); }
    catch (e) { $("d-error").textContent = e.message; }
    await poll();
  });

  canvas.addEventListener("click", (ev) => {
    if (!state.view) return;
    const rect = canvas.getBoundingClientRect();
    const [lat, lon] = fromCanvas((ev.clientX - rect.left) * state.view.dpr, (ev.clientY - rect.top) * state.view.dpr);
    state.draft = [lat, lon];
    $("f-lat").value = lat.toFixed(6);
    $("f-lon").value = lon.toFixed(6);
    $("f-complaint").focus();
    draw();
  });

  $("new-incident").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("form-error").textContent = "";
    const body = {
      lat_deg: Number($("f-lat").value),
      lon_deg: Number($("f-lon").value),
      complaint: $("f-complaint").value,
      priority: $("f-priority").value,
      caller_notes: $("f-notes").value,
    };
    if ($("f-case").value) body.case_type = $("f-case").value;
    try {
      const created = await api("POST", "/api/incidents", body);
      state.draft = null;
      $("new-incident").reset();
      await poll();
      await select(created.incident_id);
    } catch (e) {
      $("form-error").textContent = e.message;
    }
  });

  function tick() {
    $("clock").textContent = new Date().toISOString().slice(11, 19) + " UTC";
    renderAlerts(); // the escalation count-downs
  }

  async function start() {
    tick();
    setInterval(tick, 1000);
    try {
      const [roads, hospitals] = await Promise.all([api("GET", "/api/map/roads"), api("GET", "/api/hospitals")]);
      state.roads = roads;
      state.hospitals = hospitals;
    } catch (e) {
      $("link").textContent = "NO MAP";
      $("link").className = "link down";
      return;
    }
    fitView();
    window.addEventListener("resize", () => { fitView(); draw(); });
    await poll();
    setInterval(poll, POLL_MS);
  }

  window.ghConsole = { state, toPixel, ready: () => state.view !== null && state.polls > 0 };
  start();
})();
