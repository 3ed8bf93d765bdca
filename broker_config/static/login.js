// Sign-in, one script for every GoldenHour sign-in page (dispatch console, ED board): POST /api/auth/login (the
// server answers with HttpOnly session cookies; the board forwards it to dispatch), then back to the page that sent
// us here (same-origin paths only, never another site).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const next = params.get("next");
  // only a page of this very origin (a "/\\evil.example" or "/\t/evil.example" must not leave the site)
  let target = document.body.dataset.home || "/";
  if (next && next.startsWith("/")) {
    try {
      const url = new URL(next, location.origin);
      if (url.origin === location.origin) target = url.pathname + url.search + url.hash;
    } catch (e) { /* keep the home page */ }
  }
  const say = (text) => { $("message").textContent = text; };

  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    say("");
    const body = { username: $("username").value, password: $("password").value };
    const code = $("totp").value.trim();
    if (code) body.totp = code;
    $("submit").disabled = true;
    try {
      const res = await fetch("/api/auth/login", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (res.ok) { location.replace(target); return; }
      let detail = "";
      try { detail = (await res.json()).detail || ""; } catch (e) { detail = ""; }
      if (res.status === 401 && detail === "totp_required") {
        $("totp-row").classList.remove("hidden");
        $("totp").focus();
        say("Enter the 6-digit code from your authenticator app.");
      } else if (res.status === 423) {
        say("Account locked after repeated failed sign-ins. Try again in 15 minutes or call the administrator.");
      } else if (res.status === 429) {
        const wait = Number(res.headers.get("Retry-After")) || 60;
        say("Too many sign-in attempts from this computer. Try again in " + Math.ceil(wait / 60) + " min.");
      } else if (res.status === 401) {
        say("Wrong username, password or code.");
      } else {
        say("Sign-in is unavailable right now (HTTP " + res.status + ").");
      }
    } catch (e) {
      say("No connection to the server.");
    } finally {
      $("submit").disabled = false;
    }
  });
})();
