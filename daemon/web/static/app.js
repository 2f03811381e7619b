// infinitetalkd page: refresh the live fragment by polling, the results only when they change,
// and send cancel / retry / submit to the JSON API with the page's CSRF value. The server renders
// (and escapes) every fragment; this script never builds HTML from data.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const live = document.getElementById("live");
  const finished = document.getElementById("finished");
  let version = null;
  let timer = null;

  async function refresh() {
    clearTimeout(timer);
    try {
      const r = await fetch("/partials/live", {credentials: "same-origin", cache: "no-store"});
      if (r.status === 401) { location.href = "/login"; return; }
      live.innerHTML = await r.text();
      const v = r.headers.get("x-finished-version");
      if (v && v !== version) {
        const playing = [...finished.querySelectorAll("video")].some(function (el) { return !el.paused; });
        if (!playing || version === null) {
          const f = await fetch("/partials/finished", {credentials: "same-origin", cache: "no-store"});
          if (f.ok) { finished.innerHTML = await f.text(); version = v; }
        }
      }
    } catch (e) {
      const p = document.createElement("p");
      p.className = "banner error";
      p.textContent = "The web server cannot be reached; retrying.";
      live.replaceChildren(p);
    }
    timer = setTimeout(refresh, 1500);
  }

  async function post(url, body) {
    const r = await fetch(url, {method: "POST", body: body, credentials: "same-origin",
                                headers: {"X-CSRF-Token": csrf}});
    let doc = {};
    try { doc = await r.json(); } catch (e) { doc = {}; }
    return [r, doc];
  }

  document.addEventListener("click", async function (ev) {
    const b = ev.target.closest("button[data-action]");
    if (!b) return;
    b.disabled = true;
    const [r, doc] = await post("/api/v1/jobs/" + b.dataset.job + "/" + b.dataset.action, null);
    if (!r.ok) alert(doc.error || ("HTTP " + r.status));
    version = "";
    refresh();
  });

  function settingValue(el) {
    const v = el.value.trim();
    if (v === "") return undefined;
    switch (el.dataset.kind) {
      case "int": case "float": return Number(v);
      case "bool": return v === "true";
      case "json": return JSON.parse(v);
      default: return v;
    }
  }

  const form = document.getElementById("submit-form");
  const out = document.getElementById("submit-result");
  form.addEventListener("submit", async function (ev) {
    ev.preventDefault();
    const settings = {};
    const data = new FormData();
    try {
      for (const el of form.querySelectorAll("[name^='s_']")) {
        const v = settingValue(el);
        if (v !== undefined) settings[el.name.slice(2)] = v;
      }
    } catch (e) { out.textContent = "A setting is not valid JSON: " + e.message; return; }
    for (const name of ["portrait", "speech", "speech2"]) {
      const f = form.elements[name].files[0];
      if (f) data.append(name, f, f.name);
    }
    data.append("stem", form.elements.stem.value);
    data.append("settings", JSON.stringify(settings));
    data.append("wait_s", "5");
    out.textContent = "Uploading...";
    const [r, doc] = await post("/api/v1/jobs", data);
    if (!r.ok) { out.textContent = "Refused: " + (doc.error || ("HTTP " + r.status)); return; }
    out.textContent = "Submitted as " + doc.stem + (doc.job_id ? " (job #" + doc.job_id + ", " + doc.status + ")"
                                                     : " (waiting in the inbox" + (doc.waiting ? ": " + doc.waiting : "") + ")");
    form.reset();
    refresh();
  });

  refresh();
})();
