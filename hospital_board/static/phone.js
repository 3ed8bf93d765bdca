// GoldenHour phone view: one patient's ECG strip (lead selectable), key vitals with ages, teams and Acknowledge.
// Same feed as the detail view (/api/events?hospital=..&unit=..). Text only through textContent (FF-16).
"use strict";

(function () {
  const G = window.GH;
  const HOSPITAL = document.body.dataset.hospital;
  const UNIT = document.body.dataset.unit;
  const PXMM = G.pxPerMm();
  const q = (id) => document.getElementById(id);

  let limits = { stale: 10, nibp: 300, ecgWindow: 10 };
  let card = null, cardT = null, vitalsT = null;
  let strip = G.newStrip();
  let lead = 0;

  function alertOf() { return card && card.alerts.length ? card.alerts[0] : null; }

  function render() {
    const a = alertOf();
    const banner = q("banner");
    banner.classList.remove("prio-high", "prio-medium", "prio-low");
    if (a) {
      banner.classList.add("prio-" + a.priority);
      G.setText(banner.querySelector(".prio-text"), G.PRIO_TEXT[a.priority] || a.priority);
      G.setText(q("case-type"), G.CASE_TEXT[a.case_type] || a.case_type);
      G.renderActivations(q("acts"), a, cardT, (dept, b) => ack(dept, b));
      const acked = a.state === "acknowledged";
      const b = q("ack-all");
      b.classList.toggle("hidden", acked);
      b.disabled = false;
      G.setText(b, a.activations && a.activations.length > 1 ? "Acknowledge all" : "Acknowledge");
      q("ack-state").classList.toggle("done", acked);
      G.setText(q("ack-state"), acked ? "ACKNOWLEDGED" + (a.acknowledged_by ? " by " + a.acknowledged_by : "") :
        a.state === "escalated" ? "ESCALATED - not yet acknowledged" : "");
    }
    G.renderVitals(document, card.vitals, vitalsT || cardT, limits, card.availability === "offline");
  }

  async function ack(department, button) {
    const a = alertOf();
    if (!a) return;
    const b = button || q("ack-all");
    b.disabled = true;
    G.setText(q("ack-state"), "Sending...");
    try {
      const alert = await G.postAck(HOSPITAL, a.alert_id, department, "ed_phone");
      card.alerts = card.alerts.map((x) => (x.alert_id === alert.alert_id ? alert : x));
      render();
    } catch (err) {
      b.disabled = false;
      G.setText(q("ack-state"), "NOT DELIVERED - press again (" + (err && err.message ? err.message : "error") + ")");
    }
  }
  q("ack-all").addEventListener("click", () => ack(null, null));

  function renderLeads() {
    const leads = G.stripLeads(strip);
    const box = q("leads");
    const want = leads.join(",") + "|" + lead;
    if (box.dataset.want === want) return;
    box.dataset.want = want;
    box.replaceChildren();
    leads.forEach((name, i) => {
      const b = G.el("button", i === lead ? "on" : "", name);
      b.type = "button";
      b.addEventListener("click", () => { lead = i; renderLeads(); });
      box.appendChild(b);
    });
  }

  const wrap = G.el("div", "ecg-wrap");
  const canvas = G.el("canvas", "ecg");
  const label = G.el("span", "ecg-label");
  const state = G.el("span", "ecg-state");
  wrap.append(canvas, label, state);
  q("ecg-strips").appendChild(wrap);

  function frame() {
    G.drawStrip(canvas, strip, lead, { pxPerMm: PXMM });
    const leads = G.stripLeads(strip);
    G.setText(label, leads.length ? "Lead " + leads[Math.min(lead, leads.length - 1)] + "  25 mm/s" : "");
    G.setText(state, G.stripState(strip, lead, card && card.ecg_lost, card && card.availability === "offline"));
    window.requestAnimationFrame(frame);
  }

  function tick() {
    if (!card) return;
    const a = alertOf();
    const now = G.serverNow();
    if (a && a.eta_at && now !== null) {
      const left = Math.round((G.parseT(a.eta_at) - now) / 1000);
      G.setText(q("eta-value"), left <= 0 ? "ARRIVING" : "ETA " + G.fmtCountdown(left));
    }
    document.querySelectorAll(".vital").forEach(G.tickVital);
    G.tickActivations(q("acts"));
  }

  const handlers = {
    detail: (d) => {
      limits = { stale: d.stale_after_s, nibp: d.nibp_stale_after_s, ecgWindow: d.ecg_window_s };
      q("gone").classList.add("hidden");
      card = d.card; cardT = d.server_time; vitalsT = d.server_time;
      strip = G.newStrip();
      d.ecg_leads.forEach((s) => G.addSegment(strip, s, limits.ecgWindow));
      render(); renderLeads();
    },
    tick: () => {},
    alert: (ev) => { card = ev.card; cardT = ev.server_time; vitalsT = ev.server_time; render(); },
    removed: () => { q("gone").classList.remove("hidden"); G.renderLink(q("link"), "gone"); },
    vitals: (ev) => { if (card) { card.vitals = ev.vitals; vitalsT = ev.server_time; render(); } },
    unit: (ev) => { if (card) { card.availability = ev.availability; card.ecg_lost = ev.ecg_lost; render(); } },
    ecg_leads: (ev) => { G.addSegment(strip, ev.segment, limits.ecgWindow); if (card) card.ecg_lost = false; renderLeads(); },
  };

  G.connectFeed("/api/events?hospital=" + encodeURIComponent(HOSPITAL) + "&unit=" + encodeURIComponent(UNIT), handlers,
    (s) => G.renderLink(q("link"), s), 8000);
  setInterval(tick, 500);
  window.requestAnimationFrame(frame);
})();
