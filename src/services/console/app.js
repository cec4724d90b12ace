// fleetwave's console: plain JavaScript, no build step. Everything shown comes from
// /api/v1/status (streamed as server-sent events) and a few read-only endpoints.
"use strict";

const state = {
  status: null,
  host: null, // { name, data, key }: the host page's detail
  images: null,
  sessions: null,
  unknown: null,
  fetchedAt: {},
};
// Read by the browser test: how many snapshots arrived since the page loaded.
window.fwUpdates = 0;
window.fwLoadedAt = Date.now();

const $ = (id) => document.getElementById(id);

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function bytes(n) {
  if (n == null) return "";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${u[i]}`;
}

function when(secs) {
  if (!secs) return "";
  return new Date(secs * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function duration(s) {
  if (!isFinite(s) || s < 0) return "";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

const short = (d) => (d ? String(d).slice(0, 12) : "");
const badge = (s) => `<span class="badge s-${esc(s)}">${esc(s)}</span>`;
const link = (kind, name) => `<a href="#/${kind}/${encodeURIComponent(name)}">${esc(name)}</a>`;

function progressBar(h) {
  const p = h.progress;
  if (!p || !p.total_bytes) return "";
  const pct = Math.min(100, Math.floor((100 * p.done_bytes) / p.total_bytes));
  const eta = p.bytes_per_sec > 0 ? duration((p.total_bytes - p.done_bytes) / p.bytes_per_sec) : "";
  return `<div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100"
      aria-valuenow="${pct}" data-host="${esc(h.name)}"><span style="width:${pct}%"></span></div>
    <div class="bar-text">${pct}% · ${bytes(p.done_bytes)} of ${bytes(p.total_bytes)}
      ${p.bytes_per_sec ? `· ${bytes(p.bytes_per_sec)}/s` : ""} ${eta ? `· ${eta} left` : ""}</div>`;
}

// --- Actions (admin token) ---------------------------------------------------------

function token() { return sessionStorage.getItem("fleetwave-token") || ""; }
function authHeaders() { return token() ? { Authorization: `Bearer ${token()}` } : {}; }

function showToken() {
  $("token-button").textContent = token() ? "Admin token ✓" : "Admin token";
}

$("token-button").addEventListener("click", () => {
  const t = prompt("Admin token (kept in this tab only; empty to forget it):", "");
  if (t === null) return;
  if (t) sessionStorage.setItem("fleetwave-token", t.trim());
  else sessionStorage.removeItem("fleetwave-token");
  showToken();
  render();
});

async function act(path, what) {
  const out = $("message");
  try {
    const r = await fetch(path, { method: "POST", headers: { Authorization: `Bearer ${token()}` } });
    const text = (await r.text()).trim();
    if (out) out.innerHTML = r.ok
      ? `<div class="card">${esc(what)}: done. ${esc(text)}</div>`
      : `<div class="card alert">${esc(what)} refused (${r.status}): ${esc(text)}</div>`;
  } catch (e) {
    if (out) out.innerHTML = `<div class="card alert">${esc(what)}: ${esc(e)}</div>`;
  }
}

document.addEventListener("click", (e) => {
  const b = e.target.closest("button[data-act]");
  if (!b) return;
  const host = b.dataset.host ? encodeURIComponent(b.dataset.host) : "";
  const paths = { retry: `/api/v1/retry/${host}`, wake: `/api/v1/wake/${host}`, sync: "/api/v1/sync" };
  act(paths[b.dataset.act], b.textContent);
});

const actionButton = (act, label, host) =>
  `<button type="button" data-act="${act}" ${host ? `data-host="${esc(host)}"` : ""}
    ${token() ? "" : 'disabled title="set the admin token first"'}>${esc(label)}</button>`;

// --- Pages -------------------------------------------------------------------------

function commitPanel(s) {
  const a = s.applied, t = s.attempted;
  let html = `<div class="card"><div class="kv">
    <span class="muted">Source</span><span class="mono">${esc(s.source)}</span>
    <span class="muted">Serving</span><span class="mono">${a ? `${esc(short(a.id))} <span class="muted">read ${when(a.at)}</span>` : "nothing yet"}</span>`;
  if (t && (!a || t.id !== a.id)) {
    html += `<span class="muted">Newest read</span><span class="mono">${esc(short(t.id))} <span class="muted">${when(t.at)}</span></span>`;
  }
  html += `</div><div class="actions">${actionButton("sync", "Read the source now")}</div></div>`;
  if (t && t.problems && t.problems.length) {
    html += `<div class="card alert" id="stalled-commit"><b>Commit ${esc(short(t.id))} is Stalled</b>:
      it is invalid, and ${a ? esc(short(a.id)) : "nothing"} keeps serving. Fix it in git:
      <pre class="mono">${esc(t.problems.join("\n"))}</pre></div>`;
  }
  return html;
}

function hostRows(hosts) {
  return `<table><thead><tr><th>Host</th><th>State</th><th class="wide">Site</th><th>Wave</th>
    <th class="wide">Task</th><th>Progress</th><th>Why</th></tr></thead><tbody>${hosts.map((h) => `
    <tr data-host="${esc(h.name)}"><td>${link("host", h.name)}</td><td>${badge(h.state)}</td>
      <td class="wide">${esc(h.site)}</td><td>${link("wave", h.wave)}</td>
      <td class="wide">${esc(h.task)}</td><td>${progressBar(h)}</td>
      <td>${h.reason ? `<b>${esc(h.reason)}</b> ` : ""}${esc(h.message)}</td></tr>`).join("")}
    </tbody></table>`;
}

function fleetPage(s) {
  const byState = {};
  for (const h of s.hosts) byState[h.state] = (byState[h.state] || 0) + 1;
  let html = `<h1>Fleet</h1><div id="message"></div>${commitPanel(s)}
    <div class="chips">${Object.entries(byState).sort().map(([k, n]) =>
      `<span class="chip"><b>${n}</b>${badge(k)}</span>`).join("")}</div>`;
  const sites = [...new Set(s.hosts.map((h) => h.site))].sort();
  const states = Object.keys(byState).sort();
  for (const site of sites) {
    const hosts = s.hosts.filter((h) => h.site === site);
    const waves = [...new Set(hosts.map((h) => h.wave))];
    html += `<h2>Site ${esc(site)}</h2><div class="card"><table><thead><tr><th>Wave</th>
      ${states.map((k) => `<th>${badge(k)}</th>`).join("")}</tr></thead><tbody>
      ${waves.map((w) => `<tr><td>${link("wave", w)}</td>${states.map((k) =>
        `<td>${hosts.filter((h) => h.wave === w && h.state === k).length || ""}</td>`).join("")}</tr>`).join("")}
      </tbody></table></div>`;
  }
  html += `<h2>Waves</h2><div class="card"><table><thead><tr><th>Wave</th><th>State</th>
    <th>Done</th><th>In flight</th><th>Failed / budget</th><th class="wide">Why</th></tr></thead><tbody>
    ${s.waves.map((w) => `<tr><td>${link("wave", w.name)}</td><td>${badge(w.state)}</td>
      <td>${w.done} of ${w.hosts}</td><td>${w.in_flight}</td><td>${w.failed} / ${w.failure_budget}</td>
      <td class="wide">${esc(w.message)}</td></tr>`).join("")}</tbody></table></div>`;
  html += `<h2>Hosts</h2><div class="card">${hostRows(s.hosts)}</div>`;
  html += eventsCard(s.events, "Newest events");
  return html;
}

function wavePage(s, name) {
  const w = s.waves.find((x) => x.name === name);
  if (!w) return `<h1>Wave ${esc(name)}</h1><p>No such wave in the fleet being served.</p>`;
  const hosts = s.hosts.filter((h) => h.wave === name);
  const flying = hosts.filter((h) => ["Armed", "Booting", "Imaging", "Verifying"].includes(h.state));
  const used = w.failure_budget ? Math.round((100 * w.failed) / w.failure_budget) : (w.failed ? 100 : 0);
  return `<h1>Wave ${esc(name)} ${badge(w.state)}</h1><div class="card"><div class="kv">
      <span class="muted">Converged</span><span>${w.done} of ${w.hosts}</span>
      <span class="muted">In flight</span><span>${w.in_flight}</span>
      <span class="muted">Failure budget used</span><span>${w.failed} of ${w.failure_budget} (${used}%)</span>
      <span class="muted">Canaries</span><span>${w.canaries.length ? w.canaries.map((c) => link("host", c)).join(", ") : "none"}</span>
      <span class="muted">Why</span><span>${esc(w.message)}</span></div></div>
    <h2>In flight</h2><div class="card">${flying.length ? hostRows(flying) : '<p class="muted">No host of this wave is being imaged.</p>'}</div>
    <h2>Every host of the wave</h2><div class="card">${hostRows(hosts)}</div>`;
}

function eventsCard(events, title) {
  if (!events || !events.length) return "";
  return `<h2>${esc(title)}</h2><div class="card"><table><tbody>${events.map((e) => `
    <tr><td class="mono">${when(e.at)}</td><td>${e.host ? link("host", e.host) : ""}</td>
      <td>${badge(e.kind)}</td><td>${esc(e.message)}</td></tr>`).join("")}</tbody></table></div>`;
}

function hostPage(s, name) {
  const h = s.hosts.find((x) => x.name === name);
  if (!h) return `<h1>${esc(name)}</h1><p>Not in the fleet being served.</p>`;
  const key = JSON.stringify(h);
  if (!state.host || state.host.name !== name || state.host.key !== key) {
    state.host = { name, key, data: state.host && state.host.name === name ? state.host.data : null };
    fetch(`/api/v1/hosts/${encodeURIComponent(name)}`, { headers: authHeaders() })
      .then((r) => r.json()).then((d) => {
      if (state.host && state.host.name === name) { state.host.data = d; render(); }
    }).catch(() => {});
  }
  const d = state.host.data || {};
  let html = `<h1>${esc(name)} ${badge(h.state)}</h1><div id="message"></div>
    <div class="actions">${actionButton("retry", "Retry now", name)}${actionButton("wake", "Wake (Wake-on-LAN)", name)}</div>
    <div class="card"><div class="kv">
      <span class="muted">MAC</span><span class="mono">${esc(h.mac)}</span>
      <span class="muted">Site / wave</span><span>${esc(h.site)} / ${link("wave", h.wave)}</span>
      <span class="muted">Image</span><span>${esc(h.image || "none")}</span>
      <span class="muted">Deployed</span><span class="mono">${esc(h.deployed || "nothing verified yet")}</span>
      <span class="muted">Task</span><span>${esc(h.task || "none")}</span>
      <span class="muted">Progress</span><span>${progressBar(h) || "—"}</span>
      <span class="muted">Failures</span><span>${h.failures}</span>
      <span class="muted">Last seen</span><span>${when(h.last_seen) || "never"}</span>
      ${h.reason ? `<span class="muted">Why</span><span><b>${esc(h.reason)}</b> ${esc(h.message)}${h.until ? ` (until ${when(h.until)})` : ""}</span>` : ""}
    </div></div>
    <h2>Conditions</h2><div class="card"><table><thead><tr><th>Type</th><th>Status</th><th>Reason</th>
      <th>Message</th><th class="wide">Commit</th><th class="wide">Since</th></tr></thead><tbody>
      ${h.conditions.map((c) => `<tr><td>${esc(c.type)}</td><td>${c.status ? "True" : "False"}</td>
        <td>${esc(c.reason)}</td><td>${esc(c.message)}</td><td class="wide mono">${esc(short(c.commit))}</td>
        <td class="wide">${when(c.at)}</td></tr>`).join("")}</tbody></table></div>`;
  if (d.tasks) {
    html += `<h2>Tasks</h2><div class="card"><table><thead><tr><th>#</th><th>Task</th><th>Armed</th>
      <th>Ended</th><th>Result</th><th>Verified digest</th></tr></thead><tbody>
      ${d.tasks.map((t) => `<tr><td>${t.id}</td><td>${esc(t.task.kind)} ${esc(t.task.image || "")}</td>
        <td>${when(t.armed_at)}</td><td>${when(t.ended_at)}</td>
        <td>${t.result ? (t.result.ok ? badge("done") : badge("Failed")) + " " + esc(t.result.message) : ""}
          ${t.result && t.result.log_tail ? `<pre class="snippet">${esc(t.result.log_tail)}</pre>` : ""}</td>
        <td class="mono">${esc(short(t.result && t.result.digest))}</td></tr>`).join("")}</tbody></table></div>`;
  }
  const inv = d.inventory && d.inventory.inventory;
  if (inv) {
    html += `<h2>Inventory <span class="muted">${when(d.inventory.at)}</span></h2><div class="card">
      <div class="kv"><span class="muted">CPU</span><span>${esc(inv.cpu_model)} (${inv.cpu_threads} threads)</span>
      <span class="muted">Memory</span><span>${bytes(inv.memory_bytes)}</span></div>
      <table><thead><tr><th>Disk</th><th>Size</th><th>Model</th><th class="wide">Serial</th><th>Transport</th></tr></thead><tbody>
      ${inv.disks.map((k) => `<tr><td class="mono">${esc(k.name)}</td><td>${bytes(k.size_bytes)}</td>
        <td>${esc(k.model)}</td><td class="wide">${esc(k.serial)}</td><td>${esc(k.transport)}</td></tr>`).join("")}
      </tbody></table></div>`;
  }
  html += eventsCard(d.events, "Events");
  return html;
}

function refresh(key, url, every) {
  const now = Date.now();
  if (state.fetchedAt[key] && now - state.fetchedAt[key] < every) return;
  state.fetchedAt[key] = now;
  fetch(url, { headers: authHeaders() }).then((r) => r.json())
    .then((d) => { state[key] = d; render(); }).catch(() => {});
}

function imagesPage() {
  refresh("images", "/api/v1/images", 5000);
  if (!state.images) return `<h1>Images</h1><p class="muted">Loading…</p>`;
  const captured = {};
  for (const e of (state.status && state.status.events) || []) {
    if (e.kind === "ImageVersionCommitted") captured[e.message] = e;
  }
  return `<h1>Images</h1>${state.images.map((img) => `
    <h2>${esc(img.name)}</h2><div class="card"><table><thead><tr><th>Version</th><th>Generation</th>
      <th>Captured</th><th>Disk</th><th>Stored</th><th>New in this version</th><th class="wide">Chunks</th></tr></thead><tbody>
    ${img.versions.map((v) => `<tr><td class="mono">${esc(short(v.digest))}</td><td>${v.generation}</td>
      <td>${when(v.captured_at)}${v.made_by ? `<br><span class="muted">from ${v.made_by.host ? link("host", v.made_by.host) : esc(v.made_by.mac)},
        task ${v.made_by.task}${v.made_by.commit ? `, commit <span class="mono">${esc(short(v.made_by.commit))}</span>` : ""}${v.made_by.signer ? `, signed by ${esc(v.made_by.signer)}` : ""}</span>` : ""}</td>
      <td>${bytes(v.disk_bytes)}</td><td>${bytes(v.stored_bytes)}</td>
      <td>${bytes(v.new_bytes)} ${v.stored_bytes ? `(${Math.round((100 * v.new_bytes) / v.stored_bytes)}%)` : ""}</td>
      <td class="wide">${v.chunks}</td></tr>`).join("")}</tbody></table></div>`).join("") ||
    '<p class="muted">No image captured yet.</p>'}`;
}

function multicastPage() {
  refresh("sessions", "/api/v1/multicast/sessions", 2000);
  const m = state.sessions;
  if (!m) return `<h1>Multicast</h1><p class="muted">Loading…</p>`;
  return `<h1>Multicast sessions</h1><h2>Sending now</h2><div class="card">${m.running.length ? `<table>
      <thead><tr><th>Session</th><th>Group</th><th>Version</th><th>Rate</th></tr></thead><tbody>
      ${m.running.map((r) => `<tr><td>${esc(r.id)}</td><td class="mono">${esc(r.group)}</td>
        <td class="mono">${esc(short(r.digest))}</td><td>${bytes(r.rate_bps / 8)}/s</td></tr>`).join("")}
      </tbody></table>` : '<p class="muted">None.</p>'}</div>
    <h2>Ended</h2><div class="card">${m.ended.length ? `<table><thead><tr><th>Session</th><th>Ended</th>
      <th>Receivers</th><th>Data</th><th>Time</th><th>Rate</th><th>Repairs</th></tr></thead><tbody>
      ${m.ended.map((r) => `<tr><td>${esc(r.session)}</td><td>${esc(r.ended)}</td>
        <td>${r.receivers_complete} of ${r.receivers_joined}${r.receivers_lossy ? ` (${r.receivers_lossy} lossy)` : ""}</td>
        <td>${bytes(r.data_bytes)}</td><td>${duration(r.send_secs)}</td>
        <td>${r.send_secs ? bytes(r.data_bytes / r.send_secs) + "/s" : ""}</td>
        <td>${r.repair_datagrams} (${r.repairs_unicast} unicast)</td></tr>`).join("")}
      </tbody></table>` : '<p class="muted">None yet.</p>'}</div>`;
}

function unknownPage(s) {
  refresh("unknown", "/api/v1/hosts?unknown=true", 3000);
  if (!state.unknown) return `<h1>Unknown hosts</h1><p class="muted">Loading…</p>`;
  const site = (s.hosts[0] && s.hosts[0].site) || "SITE";
  return `<h1>Unknown hosts</h1><p>Machines that booted here but are not in the fleet. To adopt one,
    commit its entry to the fleet's repository (name it, give it an image and a wave).</p>
    ${state.unknown.map((u) => {
      const name = "pc-" + String(u.mac).split(":").slice(3).join("");
      const disk = u.inventory.disks[0];
      return `<div class="card"><div class="kv"><span class="muted">MAC</span><span class="mono">${esc(u.mac)}</span>
        <span class="muted">Seen</span><span>${when(u.at)}</span>
        <span class="muted">Machine</span><span>${esc(u.inventory.dmi && u.inventory.dmi.product_name)} ·
          ${bytes(u.inventory.memory_bytes)} · ${disk ? `${esc(disk.name)} ${bytes(disk.size_bytes)}` : "no disk"}</span></div>
        <pre class="snippet mono">hosts:\n  ${esc(name)}: {mac: "${esc(u.mac)}", site: ${esc(site)}}</pre></div>`;
    }).join("") || '<p class="muted">None.</p>'}`;
}

// --- Routing and the live stream ----------------------------------------------------

function render() {
  const s = state.status;
  const main = $("main");
  if (!s) return;
  const [, page, arg] = (location.hash || "#/").split("/");
  const name = arg ? decodeURIComponent(arg) : "";
  const scrollY = window.scrollY;
  main.innerHTML =
    page === "wave" ? wavePage(s, name)
    : page === "host" ? hostPage(s, name)
    : page === "images" ? imagesPage()
    : page === "multicast" ? multicastPage()
    : page === "unknown" ? unknownPage(s)
    : fleetPage(s);
  window.scrollTo(0, scrollY);
  $("footer").textContent = `${s.hosts.length} hosts · updated ${new Date().toLocaleTimeString()}`;
}

// The status stream, read with fetch rather than EventSource so that it can carry the
// token (a server may require one to read: docs/security.md).
async function connect() {
  const live = $("live");
  const show = (on) => {
    live.textContent = on ? "live" : "reconnecting";
    live.className = on ? "live on" : "live off";
  };
  for (;;) {
    try {
      const r = await fetch("/api/v1/status/stream", { headers: authHeaders() });
      if (r.status === 401 || r.status === 403) {
        $("main").innerHTML = `<div class="card alert">This server asks for a token to read its
          status (${r.status}). Set one with <b>Admin token</b> (a token of scope read is enough).</div>`;
        show(false);
        await new Promise((ok) => setTimeout(ok, 3000));
        continue;
      }
      if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
      show(true);
      const reader = r.body.getReader();
      const text = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += text.decode(value, { stream: true });
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (block.includes("event: status") && data) {
            state.status = JSON.parse(data);
            window.fwUpdates += 1;
            render();
          }
        }
      }
    } catch (e) {
      // The server went away or restarted: try again shortly.
    }
    show(false);
    await new Promise((ok) => setTimeout(ok, 2000));
  }
}

window.addEventListener("hashchange", () => { state.fetchedAt = {}; render(); });
showToken();
connect();
