"use strict";
// The crew screen.  Every text from the agent, the crew or the hospital is put in the page with textContent only.
(() => {
  const $ = (sel) => document.querySelector(sel);
  const LABELS = {
    en_route: "EN ROUTE", on_scene: "ON SCENE", patient_contact: "PATIENT CONTACT", transporting: "TRANSPORTING",
    at_hospital: "AT HOSPITAL", handed_over: "HANDED OVER",
  };
  const STAGES = [["queued", "QUEUED"], ["sent", "SENT"], ["stored", "STORED"], ["on_board", "ON BOARD"],
    ["acknowledged", "ACKNOWLEDGED"]];
  const form = { case_type: null, sex: "unknown", tri: {}, lams: null, red: new Set() };
  let built = false;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function clock(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    if (seconds < 90) return `${Math.round(seconds)} s`;
    return `${Math.round(seconds / 60)} min`;
  }

  async function call(method, path, body) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), 4000);
    try {
      const resp = await fetch(path, {
        method, signal: ctrl.signal,
        headers: body ? { "Content-Type": "application/json" } : {},
        body: body ? JSON.stringify(body) : undefined,
      });
      if (!resp.ok) {
        // the agent's own words when it has them (a full storage: "NOT SENT ... phone the hospital")
        let detail = "";
        try { const b = await resp.json(); detail = typeof b.detail === "string" ? b.detail : ""; } catch (e) { detail = ""; }
        throw new Error(detail || `HTTP ${resp.status}`);
      }
      return await resp.json();
    } finally {
      clearTimeout(timer);
    }
  }

  function select(group, button) {
    document.querySelectorAll(group).forEach((b) => b.classList.toggle("selected", b === button));
  }

  function buildOnce(state) {
    if (built) return;
    built = true;
    const buttons = $("#status-buttons");
    for (const status of state.buttons) {
      const b = el("button", "status", LABELS[status] || status);
      b.type = "button";
      b.dataset.status = status;
      b.addEventListener("click", async () => {
        b.disabled = true;
        try { render(await call("POST", "/api/status", { status })); } catch (e) { flash(`Status not saved: ${e.message}`); }
        finally { b.disabled = false; }
      });
      buttons.appendChild(b);
    }
    const lams = $("#lams-buttons");
    for (let i = 0; i <= 5; i++) {
      const b = el("button", "choice lams", i);
      b.type = "button";
      b.dataset.lams = String(i);
      b.addEventListener("click", () => { form.lams = form.lams === i ? null : i; select(".lams", form.lams === null ? null : b); });
      lams.appendChild(b);
    }
    const red = $("#red-criteria");
    for (const criterion of state.trauma_red_criteria) {
      const b = el("button", "choice red", criterion);
      b.type = "button";
      b.addEventListener("click", () => {
        if (form.red.has(criterion)) form.red.delete(criterion); else form.red.add(criterion);
        b.classList.toggle("selected", form.red.has(criterion));
      });
      red.appendChild(b);
    }
  }

  function flash(text) { $("#form-message").textContent = text; }

  function num(id) {
    const v = $(id).value.trim();
    return v === "" ? null : Number(v);
  }

  function lastKnownWell() {
    const v = $("#lkw").value;
    if (!v) return null;
    const [h, m] = v.split(":").map(Number);
    const d = new Date();
    d.setHours(h, m, 0, 0);
    if (d > new Date()) d.setDate(d.getDate() - 1); // a time later than now was yesterday
    return d.toISOString();
  }

  function prealertBody() {
    const body = { case_type: form.case_type, sex: form.sex, note: $("#note").value };
    const fields = { age_years: "#age", gcs_total: "#gcs", gcs_motor: "#gcs-motor", sbp_mmhg: "#sbp",
      heart_rate_bpm: "#hr", resp_rate_per_min: "#rr", spo2_pct: "#spo2", eta_min: "#eta" };
    for (const [key, id] of Object.entries(fields)) { const v = num(id); if (v !== null) body[key] = v; }
    for (const [key, value] of Object.entries(form.tri)) body[key] = value;
    if (form.case_type === "stroke") {
      if (form.lams !== null) body.lams = form.lams;
      const lkw = lastKnownWell();
      if (lkw) body.last_known_well_at = lkw;
    }
    if (form.case_type === "trauma") body.trauma_red_criteria = [...form.red];
    return body;
  }

  function wireForm() {
    document.querySelectorAll("button.case").forEach((b) => b.addEventListener("click", () => {
      form.case_type = b.dataset.case;
      select("button.case", b);
      document.querySelectorAll("fieldset.case-only").forEach((f) => f.classList.toggle("shown", f.dataset.for === form.case_type));
      $("#send-prealert").disabled = false;
    }));
    document.querySelectorAll("button.sex").forEach((b) => b.addEventListener("click", () => {
      form.sex = form.sex === b.dataset.sex ? "unknown" : b.dataset.sex;
      select("button.sex", form.sex === "unknown" ? null : b);
    }));
    document.querySelectorAll("button.tri").forEach((b) => b.addEventListener("click", () => {
      const key = b.dataset.field;
      const value = b.dataset.value === "true";
      if (form.tri[key] === value) delete form.tri[key]; else form.tri[key] = value;
      document.querySelectorAll(`button.tri[data-field="${key}"]`).forEach((x) =>
        x.classList.toggle("selected", key in form.tri && (x.dataset.value === "true") === form.tri[key]));
    }));
    $("#prealert").addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!form.case_type) return;
      const send = $("#send-prealert");
      send.disabled = true;
      try {
        const reply = await call("POST", "/api/prealert", prealertBody());
        flash(`Pre-alert queued (${reply.alert_id.slice(-6)})`);
        await refresh();
      } catch (e) {
        flash(`Pre-alert NOT sent: ${e.message}`);
      } finally {
        send.disabled = false;
      }
    });
  }

  function renderAlert(alert) {
    const li = el("li", "alert");
    li.dataset.alertId = alert.alert_id;
    li.appendChild(el("div", "big", `${alert.case_type.toUpperCase()}  ${clock(alert.queued_at)}`));
    const stages = el("div", "stages");
    const reached = STAGES.findIndex(([key]) => key === alert.stage);
    STAGES.forEach(([key, label], i) => {
      const times = { queued: alert.queued_at, sent: alert.sent_at, stored: alert.stored_at,
        on_board: alert.on_board_at, acknowledged: alert.acknowledged_at };
      const chip = el("span", `stage${i <= reached ? " done" : ""}`, `${label} ${clock(times[key])}`.trim());
      chip.dataset.stage = key;
      stages.appendChild(chip);
    });
    if (alert.hospital_state === "escalated") stages.appendChild(el("span", "stage escalated", "ESCALATED"));
    if (alert.hospital_state === "cancelled") stages.appendChild(el("span", "stage escalated", "CANCELLED"));
    li.appendChild(stages);
    const teams = el("ul", "teams");
    for (const a of alert.activations) {
      const who = a.acknowledged_by_role ? ` by ${a.acknowledged_by_role}` : "";
      teams.appendChild(el("li", `team team-${a.state}`, `${a.department.replace("_", " ").toUpperCase()}: ${a.state}${who} (${a.level})`));
    }
    li.appendChild(teams);
    return li;
  }

  function render(state) {
    buildOnce(state);
    $("#screen-state").hidden = true;
    $("#unit").textContent = state.unit_id;
    const link = state.link;
    const pill = $("#link-state");
    pill.textContent = link.connected ? (link.watchdog_stale ? "CONNECTED - BACKLOG" : "CONNECTED") : "OFFLINE";
    pill.className = `pill ${link.connected ? (link.watchdog_stale ? "pill-warn" : "pill-on") : "pill-off"}`;
    $("#link-detail").textContent = `backlog ${link.backlog_count} (oldest ${age(link.oldest_unsent_age_s)})`;
    document.querySelectorAll("button.status").forEach((b) => b.classList.toggle("current", b.dataset.status === state.status));
    $("#status-now").textContent = state.status ? `${LABELS[state.status] || state.status} ${clock(state.status_at)}` : "";

    const dest = state.destination;
    $("#destination").textContent = dest ? (dest.hospital_name || dest.hospital_id || "-") : "No destination yet";
    $("#destination-eta").textContent = dest && dest.eta_at ? `ETA ${clock(dest.eta_at)}` : "";
    const reasons = $("#destination-reasons");
    reasons.replaceChildren(...(dest ? dest.reasons.map((r) => el("li", null, r)) : []));

    $("#alerts").replaceChildren(...state.prealerts.map(renderAlert));

    const ecg = state.ecg;
    const bps = ecg.bytes_per_sample === null ? "-" : ecg.bytes_per_sample.toFixed(2);
    $("#ecg-delivery").textContent =
      `ECG chunks: ${ecg.stored} stored, ${ecg.sent} sent, ${ecg.queued} queued; stored through #${ecg.stored_through_seq ?? "-"}; ${bps} B/sample`;
    const through = Object.entries(link.stored_through).map(([k, v]) => `${k} #${v}`).join(", ");
    $("#stored-through").textContent = `Store receipt: ${through || "none yet"} (${age(link.receipt_age_s)} ago)`;
    const budget = link.budget_bps === null ? "unlimited" : `${Math.round(link.budget_bps / 1000)} kbit/s`;
    $("#link-health").textContent =
      `Uplink budget ${budget}; in flight ${link.in_flight}; watchdog ${link.watchdog_stale ? "STALE" : "ok"}; failures ${link.publish_failures}`;
    $("#alarm-count").textContent = state.alarms_total === null ? "(no monitor)" : `${state.alarms_total} since start`;
    $("#alarms").replaceChildren(...state.alarms.map((a) => el("li", `alarm-${a.priority || "none"}`, `${a.text || "alarm"} ${clock(a.since)}`)));
  }

  async function refresh() {
    try {
      render(await call("GET", "/api/state"));
    } catch (e) {
      const s = $("#screen-state");
      s.hidden = false;
      s.textContent = "SCREEN OFFLINE";
    }
  }

  wireForm();
  refresh();
  setInterval(refresh, 1000);
})();
