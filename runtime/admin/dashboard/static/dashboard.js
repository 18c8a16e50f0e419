// fedkit study dashboard: one page, five tabs, fed by server-sent events from the local backend.
// Every string from the server (site, job and metric names come from strangers' job code) is written
// with textContent, never as HTML.
"use strict";

const TOKEN = takeToken();
const FINAL = new Set(["finished", "failed", "aborted"]);
const JOB_ID = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;  // as the backend's _JOB_ID
// Okabe-Ito: a categorical palette people with colour-vision deficiencies can tell apart
const SERIES_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442"];
// viridis anchors (matplotlib), interpolated linearly: perceptually uniform and colour-blind safe
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
  "#b5de2b", "#fde725"];

const state = { session: null, status: null, jobs: null, job: null, jobId: null, source: null, chart: null,
  chartKey: "", metric: "" };

// ---- the token -------------------------------------------------------------------------------------

// The URL `fl_admin.sh dashboard` printed ends in #token=...: a fragment, which no browser sends to a server.
// It is kept in this tab's sessionStorage (this origin's, port included: no other local server can read it)
// and taken out of the address bar, so a reload keeps working and the token is not left on screen.
function takeToken() {
  const match = /^#token=([A-Za-z0-9_-]+)$/.exec(location.hash);
  if (match) {
    sessionStorage.setItem("fedkit-token", match[1]);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("fedkit-token") || "";
}

// Every call to the dashboard's API carries the token; without it the backend answers 403.
function api(path, options) {
  const init = options || {};
  return fetch(path, { ...init, headers: { ...(init.headers || {}), "X-Fedkit-Token": TOKEN } });
}

// ---- small helpers ---------------------------------------------------------------------------------

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.append(c instanceof Node ? wrap(c) : el("td", c));
  return tr;
}

function wrap(node) {
  if (node.tagName === "TD" || node.tagName === "TH") return node;
  const td = document.createElement("td");
  td.append(node);
  return td;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(digits);
  return String(v);
}

function fmtMetrics(m) {
  if (!m) return "-";
  const keys = Object.keys(m).sort();
  return keys.length ? keys.map((k) => `${k} ${fmt(m[k])}`).join(", ") : "-";
}

function fmtTime(t) {
  return t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "-";
}

function showError(id, message) {
  const node = document.getElementById(id);
  node.hidden = !message;
  node.textContent = message || "";
}

function may(command) {
  return state.session && state.session.commands.includes(command);
}

// ---- navigation ------------------------------------------------------------------------------------

function route() {
  const [tab, id] = (location.hash.slice(1) || "study").split("/");
  const page = ["study", "jobs", "job", "cross", "audit"].includes(tab) ? tab : "study";
  // a job id as the backend takes it: with any other, the live feed would be refused, and stop for good
  const jobId = id ? decodeURIComponent(id) : "";
  if (jobId && jobId !== state.jobId && JOB_ID.test(jobId)) selectJob(jobId);
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== `page-${page}`;
  }
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.tab === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
    if ((a.dataset.tab === "job" || a.dataset.tab === "cross") && state.jobId) {
      a.href = `#${a.dataset.tab}/${encodeURIComponent(state.jobId)}`;
    }
  }
  if (page === "audit") loadAudit();
  if (page === "job") renderJob();  // uPlot needs a visible box to size itself
}

function selectJob(jobId) {
  state.jobId = jobId;
  state.job = null;
  connect();
}

// ---- the live feed ---------------------------------------------------------------------------------

// A browser opens at most six HTTP/1.1 connections to one host and port, and a live feed holds one for as
// long as it is open: with a feed per tab, a seventh tab could load nothing at all. So every tab of this
// dashboard shares one feed per job shown, kept by a SharedWorker (static/feed.js); a browser without
// SharedWorker gets a feed of its own per tab, as before.
const FEED_EVENTS = {
  status: (data) => { state.status = JSON.parse(data); renderStudy(); },
  jobs: (data) => { state.jobs = JSON.parse(data); renderJobs(); },
  job: (data) => { state.job = JSON.parse(data); renderJob(); renderCross(); },
};
const FEED_PING_MS = 5000;  // the shared feed forgets a tab it has not heard from in a while (a crashed tab)

function showConnection(ok) {
  const conn = document.getElementById("conn");
  conn.textContent = ok ? "live" : "connection to the dashboard lost; retrying…";
  conn.className = ok ? "ok" : "bad";
}

function connect() {
  if (typeof SharedWorker === "function") connectShared();
  else connectOwn();
}

function connectShared() {
  if (!state.source) {
    const port = new SharedWorker("/static/feed.js", { name: "fedkit-feed" }).port;
    port.onmessage = (e) => {
      if (e.data.job !== (state.jobId || "")) return;  // sent before this tab moved to another job
      if (e.data.kind === "conn") showConnection(e.data.ok);
      else if (e.data.kind === "event" && FEED_EVENTS[e.data.name]) FEED_EVENTS[e.data.name](e.data.data);
    };
    const watch = () => port.postMessage({ kind: "watch", token: TOKEN, job: state.jobId || "" });
    // the watch again, now and then: a tab the feed forgot (throttled in the background) is taken back
    setInterval(watch, FEED_PING_MS);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) watch(); });
    window.addEventListener("pagehide", () => port.postMessage({ kind: "leave" }));
    window.addEventListener("pageshow", (e) => { if (e.persisted) watch(); });  // back from the cache
    state.source = { watch };
  }
  state.source.watch();
}

function connectOwn() {
  if (state.source) state.source.close();
  const query = new URLSearchParams({ token: TOKEN });  // an EventSource cannot send headers
  if (state.jobId) query.set("job", state.jobId);
  const source = new EventSource(`/api/events?${query}`);
  state.source = source;
  source.onopen = () => showConnection(true);
  source.onerror = () => showConnection(false);
  for (const [name, handle] of Object.entries(FEED_EVENTS)) source.addEventListener(name, (e) => handle(e.data));
}

// ---- study -----------------------------------------------------------------------------------------

function renderStudy() {
  const s = state.status;
  if (!s) return;
  showError("status-error", s.error ? `check_status: ${s.error}` : "");
  if (s.error) return;
  const srv = s.server;
  const running = srv.running_job
    ? `running job ${srv.running_job} (${srv.running_job_name}), round ${fmt(srv.round)} of ${fmt(srv.rounds_total)}`
    : "no job running";
  document.getElementById("server-line").textContent =
    `server up ${Math.round(srv.uptime_s)} s, ${srv.sites_online} site(s) online, ${running}; ` +
    `${srv.queued.length} queued`;
  document.getElementById("server-line").dataset.round = srv.round === null ? "" : String(srv.round);
  fill(document.querySelector("#sites-table tbody"), s.sites.map((site) => {
    const stateCell = el("td", site.state, { class: `state state-${site.state.split(" ")[0]}` });
    const tr = row([site.site, site.org, stateCell, site.online ? "yes" : "no", `${fmt(site.last_heartbeat_s_ago, 1)} s ago`,
      site.job_id ? `${site.online ? "" : "last: "}job ${site.job_id}, round ${fmt(site.round)}` : "-"]);
    tr.dataset.site = site.site;
    tr.dataset.state = site.state;
    return tr;
  }));
}

// ---- jobs ------------------------------------------------------------------------------------------

function renderJobs() {
  const jobs = state.jobs;
  if (!jobs) return;
  showError("jobs-error", jobs.error ? `list_jobs: ${jobs.error}` : "");
  if (jobs.error) return;
  const sorted = [...jobs].sort((a, b) => (b.seq - a.seq) || (b.submitted_at - a.submitted_at));
  fill(document.querySelector("#jobs-table tbody"), sorted.map((j) => {
    const link = el("a", j.job_id, { href: `#job/${encodeURIComponent(j.job_id)}` });
    const actions = document.createElement("td");
    if (may("abort_job") && !FINAL.has(j.state)) actions.append(actionButton("abort", j.job_id));
    if (may("clone_job")) actions.append(actionButton("clone", j.job_id));
    const best = j.best_metric === null ? "-" : `${fmt(j.best_metric)} (r${j.best_round})`;
    const tr = row([link, j.name, j.state, `${j.submitter} (${j.submitter_role})`, fmtTime(j.submitted_at),
      `${j.rounds_done}/${j.rounds_total}`, el("code", j.config_hash.slice(0, 12), { title: j.config_hash }),
      j.overrides.join(" ") || "-", best, actions]);
    tr.dataset.job = j.job_id;
    tr.dataset.state = j.state;
    return tr;
  }));
}

function actionButton(action, jobId) {
  const button = el("button", action, { type: "button", "data-action": action,
    "aria-label": `${action} job ${jobId}` });
  button.addEventListener("click", () => act(action, jobId));
  return button;
}

async function act(action, jobId) {
  if (action === "abort" && !confirm(`Abort job ${jobId}?`)) return;
  const out = document.getElementById("action-result");
  const response = await api(`/api/jobs/${encodeURIComponent(jobId)}/${action}`, { method: "POST" });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  out.textContent = response.ok
    ? (action === "clone" ? `cloned ${jobId} as ${body.job_id}` : `${jobId}: ${body.state}`)
    : `${action} ${jobId} refused: ${body.error}`;
}

// ---- one job ---------------------------------------------------------------------------------------

function renderJob() {
  const data = state.job;
  document.getElementById("job-empty").hidden = !!state.jobId;
  document.getElementById("job-title").textContent = state.jobId || "";
  if (!data) return;
  showError("job-error", data.error ? `show_job: ${data.error}` : "");
  if (data.error) return;
  const r = data.record;
  const facts = [
    ["name", r.name], ["state", r.state + (data.queue_position ? `, queue position ${data.queue_position}` : "")],
    ["rounds", `${r.rounds_done}/${r.rounds_total}`], ["submitted by", `${r.submitter} (${r.submitter_org}, ${r.submitter_role})`],
    ["config", r.config_hash], ["overrides", r.overrides.join(" ") || "-"],
    ["started / finished", `${fmtTime(r.started_at)} / ${fmtTime(r.finished_at)}`],
    ["best", r.best_metric === null ? "-" : `${fmt(r.best_metric)} (model of round ${r.best_round})`],
    ["final metrics", fmtMetrics(r.final_metrics)],
  ];
  if (r.error) facts.push(["error", r.error]);
  const dl = document.getElementById("job-facts");
  dl.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  dl.dataset.state = r.state;
  renderRounds(data);
  renderCurves(data);
  renderDp(data.metrics);
  renderSiteReports(data.metrics);
}

function renderRounds(data) {
  const metrics = data.metrics;
  const validation = new Map(metrics.filter((m) => m.type === "validation").map((m) => [m.model_round, m]));
  let previous = data.record.started_at;
  const bestRound = data.record.best_round;  // the best model so far (validation entries mark each new best)
  const rows = [];
  for (const m of metrics) {
    if (m.type !== "round") continue;
    const took = previous && m.time ? `${(m.time - previous).toFixed(1)} s` : "-";
    previous = m.time || previous;
    const failed = Object.entries(m.failed || {}).map(([s, why]) => `${s}: ${why}`).join("; ") || "-";
    const v = validation.get(m.round - 1);
    const vText = v ? fmtMetrics(v.global) : "-";
    const vCell = el("td", vText);
    if (v && v.model_round === bestRound) vCell.append(" ", el("strong", "best", { class: "best" }));
    const tr = row([String(m.round), took, m.sites.join(", "), failed, fmtMetrics(m.train_global), vCell]);
    tr.dataset.round = String(m.round);
    rows.push(tr);
  }
  for (const m of metrics) {  // the final model's validation has no training round after it
    if (m.type === "validation" && !metrics.some((x) => x.type === "round" && x.round - 1 === m.model_round)) {
      const vCell = el("td", fmtMetrics(m.global));
      if (m.model_round === bestRound) vCell.append(" ", el("strong", "best", { class: "best" }));
      rows.push(row([`model ${m.model_round}`, "-", Object.keys(m.sites).join(", "), "-", "-", vCell]));
    }
  }
  document.getElementById("rounds-table").hidden = rows.length === 0;
  fill(document.querySelector("#rounds-table tbody"), rows);
}

// The curves: each metric of the validation entries (x: model round) and of the training rounds (x: round),
// one series per site and one for all sites together; the best model is a separate, marked series.
function curveSets(metrics, bestRound) {
  const sets = new Map();
  const add = (name, x, site, y) => {
    if (typeof y !== "number" || !Number.isFinite(y)) return;
    if (!sets.has(name)) sets.set(name, new Map());
    const series = sets.get(name);
    if (!series.has(site)) series.set(site, new Map());
    series.get(site).set(x, y);
  };
  const best = new Map();
  for (const m of metrics) {
    if (m.type === "validation") {
      for (const [k, y] of Object.entries(m.global || {})) {
        add(`validation ${k}`, m.model_round, "all sites", y);
        if (m.model_round === bestRound) best.set(`validation ${k}`, [m.model_round, y]);
      }
      for (const [site, vals] of Object.entries(m.sites || {})) {
        for (const [k, y] of Object.entries(vals || {})) add(`validation ${k}`, m.model_round, site, y);
      }
    } else if (m.type === "round") {
      for (const [k, y] of Object.entries(m.train_global || {})) add(`train ${k}`, m.round, "all sites", y);
      for (const [site, vals] of Object.entries(m.train || {})) {
        for (const [k, y] of Object.entries(vals || {})) add(`train ${k}`, m.round, site, y);
      }
    }
  }
  return { sets, best };
}

function renderCurves(data) {
  const { sets, best } = curveSets(data.metrics, data.record.best_round);
  const names = [...sets.keys()].filter((n) => !n.endsWith(" n_samples")).sort();
  const box = document.getElementById("chart-box");
  document.getElementById("curve-controls").hidden = names.length === 0;
  box.hidden = names.length === 0;
  if (!names.length) return;
  const select = document.getElementById("metric-select");
  if (!names.includes(state.metric)) state.metric = names.find((n) => n.startsWith("validation ")) || names[0];
  if ([...select.options].map((o) => o.value).join("|") !== names.join("|")) {
    select.replaceChildren(...names.map((n) => el("option", n, { value: n })));
  }
  select.value = state.metric;
  const series = sets.get(state.metric);
  const sites = [...series.keys()].sort((a, b) => (a === "all sites" ? -1 : b === "all sites" ? 1 : a.localeCompare(b)));
  const xs = [...new Set(sites.flatMap((s) => [...series.get(s).keys()]))].sort((a, b) => a - b);
  const columns = [xs, ...sites.map((s) => xs.map((x) => (series.get(s).has(x) ? series.get(s).get(x) : null)))];
  const bestPoint = best.get(state.metric);
  columns.push(xs.map((x) => (bestPoint && bestPoint[0] === x ? bestPoint[1] : null)));
  const points = columns[1].filter((v) => v !== null).length;
  const chartDiv = document.getElementById("chart");
  chartDiv.dataset.points = String(points);
  document.getElementById("chart-caption").textContent =
    `${state.metric} per ${state.metric.startsWith("train") ? "round" : "model round"}: all sites (weighted) and ` +
    `each site${bestPoint ? `; best model: round ${bestPoint[0]} (${fmt(bestPoint[1])})` : ""}`;
  const shape = `${state.metric}|${sites.join(",")}`;
  if (state.chart && state.chartKey === shape) {
    state.chart.setData(columns);
    return;
  }
  if (state.chart) state.chart.destroy();
  if (box.offsetParent === null) { state.chart = null; state.chartKey = ""; return; }  // hidden: drawn when shown
  const opts = {
    width: Math.min(1100, chartDiv.clientWidth || 900), height: 320,
    scales: { x: { time: false } },
    axes: [{ label: state.metric.startsWith("train") ? "round" : "model round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500],
      values: (u, ticks) => ticks.map((t) => String(t)) },
    { label: state.metric, size: 70, values: (u, ticks) => ticks.map((t) => String(+t.toPrecision(6))) }],
    series: [{ label: "round" },
      ...sites.map((s, i) => ({ label: s, stroke: s === "all sites" ? "#000" : SERIES_COLOURS[i % SERIES_COLOURS.length],
        width: s === "all sites" ? 3 : 1.5, dash: s === "all sites" ? undefined : [6, 3], points: { show: true } })),
      { label: "best model", stroke: "#D55E00", width: 0, points: { show: true, size: 14, fill: "#D55E00" } }],
  };
  state.chart = new uPlot(opts, columns, chartDiv);
  state.chartKey = shape;
}

function renderDp(metrics) {
  const last = new Map();
  for (const m of metrics) {
    for (const [site, report] of Object.entries(m.privacy || {})) {
      const dp = report && typeof report === "object" ? report.dp : null;
      if (dp && typeof dp === "object" && (dp.releases || 0) >= ((last.get(site) || {}).releases || 0)) last.set(site, dp);
    }
  }
  document.getElementById("dp-table").hidden = last.size === 0;
  fill(document.querySelector("#dp-table tbody"), [...last.entries()].sort().map(([site, dp]) => {
    const tr = row([site, fmtEpsilon(dp.epsilon_total), fmtDelta(dp.delta), fmt(dp.releases), fmt(dp.noise_multiplier),
      // a site with a dp_site_budget counts every job's releases together (its local/privacy.yml)
      "epsilon_site_total" in dp ? `${fmtEpsilon(dp.epsilon_site_total)} at δ ${fmtDelta(dp.site_delta ?? dp.delta)} ` +
        `after ${dp.site_releases} release${dp.site_releases === 1 ? "" : "s"}` : "-"]);
    tr.dataset.site = site;
    return tr;
  }));
}

function fmtDelta(d) {  // 1e-5, not toFixed's 0.0000
  return d === null || d === undefined ? "-" : String(d);
}

function fmtEpsilon(e) {
  return e === "inf" ? "infinite (a release had no noise)" : fmt(Number(e), 3);
}

// Per site, what its local/privacy.yml `reports:` kept back of what the job's code reported (metrics,
// logged scalars), over the whole job: a gap in a site's curve is then the site's choice, said here. A site
// says so only with a result its policy changed, so the table counts results, without a total.
function renderSiteReports(metrics) {
  const totals = new Map();
  for (const m of metrics) {
    if (m.type !== "site_reports") continue;
    for (const [site, kept] of Object.entries(m.sites || {})) {
      const t = totals.get(site) || { metrics: 0, scalars: 0, key: 0, digits: null };
      t.metrics += kept.metrics_withheld ? 1 : 0;
      t.scalars += kept.scalars_withheld ? 1 : 0;
      t.key += kept.key_metric_withheld ? 1 : 0;
      if (kept.significant_digits) t.digits = kept.significant_digits;
      totals.set(site, t);
    }
  }
  document.getElementById("reports-table").hidden = totals.size === 0;
  fill(document.querySelector("#reports-table tbody"), [...totals.entries()].sort().map(([site, t]) => {
    const tr = row([site, fmt(t.metrics), fmt(t.scalars),
      t.key ? `${t.key} (this site's scores do not count toward the best model)` : "0",
      t.digits === null ? "-" : `${t.digits} significant digits`]);
    tr.dataset.site = site;
    return tr;
  }));
}

// ---- cross-site heatmap ----------------------------------------------------------------------------

function viridis(t) {
  const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const f = x - i;
  const a = VIRIDIS[i], b = VIRIDIS[i + 1];
  const mix = (k) => Math.round(parseInt(a.slice(k, k + 2), 16) * (1 - f) + parseInt(b.slice(k, k + 2), 16) * f);
  return [mix(1), mix(3), mix(5)];
}

function renderCross() {
  const view = state.job && !state.job.error ? state.job.cross_site : null;
  document.getElementById("cross-title").textContent = state.jobId || "";
  const table = document.getElementById("heatmap");
  const legend = document.getElementById("cross-legend");
  document.getElementById("cross-empty").hidden = !!view;
  table.hidden = legend.hidden = !view || !!view.error || !view.scores;
  const head = document.getElementById("cross-head");
  if (!view) { head.textContent = ""; return; }
  if (view.error) { head.textContent = `cross-site report: ${view.error}`; return; }
  const what = view.kind === "cross_site" ? "cross-site validation" : "evaluation";
  head.textContent = `${what}: ${view.key_metric} of each model (rows) on each site's data (columns), ` +
    `${view.higher_is_better ? "higher" : "lower"} is better; outlined: a site's own model on its own data.`;
  if (!view.scores) {
    head.textContent += " The matrix is too large to show here; download_job has it (cross_site.csv).";
    return;
  }
  const values = view.models.flatMap((m) => view.sites.map((s) => view.scores[m][s])).filter((v) => typeof v === "number");
  const lo = Math.min(...values), hi = Math.max(...values);
  const thead = el("thead");
  thead.append(row([el("th", "model \\ site data", { scope: "col" }), ...view.sites.map((s) => el("th", s, { scope: "col" })),
    el("th", "own site", { scope: "col" }), el("th", "other sites (mean)", { scope: "col" })]));
  const tbody = el("tbody");
  for (const model of view.models) {
    const own = model.startsWith("site:") ? model.slice(5) : null;
    const cells = [el("th", model, { scope: "row" })];
    for (const site of view.sites) {
      const v = view.scores[model][site];
      const td = el("td", fmt(v), { class: "cell", "data-model": model, "data-site": site,
        "data-value": typeof v === "number" ? String(v) : "" });
      if (typeof v === "number") {
        const [r, g, b] = viridis(hi > lo ? (v - lo) / (hi - lo) : 0.5);
        td.style.backgroundColor = `rgb(${r}, ${g}, ${b})`;
        td.style.color = 0.299 * r + 0.587 * g + 0.114 * b > 140 ? "#000" : "#fff";
      }
      if (site === own) td.classList.add("own");
      cells.push(td);
    }
    const summary = view.summary[model] || {};
    cells.push(el("td", fmt(summary.on_diagonal), { class: "mean" }), el("td", fmt(summary.off_diagonal), { class: "mean" }));
    tbody.append(row(cells));
  }
  table.replaceChildren(el("caption", `${view.key_metric}: ${view.models.length} models × ${view.sites.length} sites`), thead, tbody);
  const sm = view.site_models || {};
  legend.textContent = `Colours: viridis from ${fmt(lo)} (dark) to ${fmt(hi)} (yellow).` +
    (sm.n_models ? ` Site models (${sm.n_models}), mean: own site ${fmt(sm.on_diagonal)}, other sites ${fmt(sm.off_diagonal)}.` : "");
}

// ---- audit -----------------------------------------------------------------------------------------

// The dashboard's own polling (and any console's reads) fill the trail with successful routine reads; they
// are hidden by default so refusals and changes stay in view. The server sends the last AUDIT_FETCH records.
const AUDIT_FETCH = 2000;
const AUDIT_SHOWN = 200;
const AUDIT_WHAT_CHARS = 160;  // the full text is in the cell's tooltip
const AUDIT_PLAIN = new Set(["time", "event", "hash", "prev", "prev_hash", "admin", "site", "peer", "org", "role"]);
const ROUTINE_READS = new Set(["check_status", "list_jobs", "show_job", "wait_job", "help"]);

async function loadAudit() {
  document.getElementById("audit-verify").textContent =
    "Verification: the server does not report its audit chain's verification over the admin link, so this page " +
    "cannot show it. The server's IT verifies the whole chain with `fedkit audit verify workspace/audit.jsonl` " +
    "on the server machine.";
  const response = await api(`/api/audit?n=${AUDIT_FETCH}`);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  const table = document.getElementById("audit-table");
  if (!response.ok) { showError("audit-error", `show_audit: ${body.error}`); table.hidden = true; return; }
  showError("audit-error", "");
  table.hidden = false;
  const hide = document.getElementById("audit-hide-reads").checked;
  const kept = body.filter((r) => !(hide && r.event === "admin_command" && ROUTINE_READS.has(r.command) &&
    r.allowed !== false && !r.error));
  const shown = kept.slice(-AUDIT_SHOWN);
  document.getElementById("audit-count").textContent =
    `${shown.length} of the last ${body.length} records` + (hide ? " (successful routine reads hidden)" : "");
  fill(table.querySelector("tbody"), shown.map((r) => {
    const who = r.admin || r.site || r.peer || "-";
    const what = r.command ? `${r.command} ${JSON.stringify(r.args || {})}` : Object.entries(r)
      .filter(([k]) => !AUDIT_PLAIN.has(k)).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
      .join(" ");
    const error = String(r.error || "");
    const outcome = r.allowed === false ? (error.startsWith("denied") ? error : `denied: ${error}`)
      : (error ? `error: ${error}` : (r.result || ""));
    const whatCell = el("td", what.length > AUDIT_WHAT_CHARS ? `${what.slice(0, AUDIT_WHAT_CHARS)}…` : what,
      { class: "what", title: what.slice(0, 2000) });
    const tr = row([String(r.time || "").replace("T", " ").slice(0, 23), r.event, who, whatCell, outcome]);
    if (r.allowed === false) tr.className = "denied";
    return tr;
  }));
}

// ---- start -----------------------------------------------------------------------------------------

async function start() {
  const response = await api("/api/session");
  if (!response.ok) {  // no token in this tab: opened without the printed URL, or a new start's token
    const conn = document.getElementById("conn");
    conn.textContent = "open the URL that `fl_admin.sh dashboard` printed (it carries this start's token)";
    conn.className = "bad";
    return;
  }
  state.session = await response.json();
  const s = state.session;
  document.getElementById("project").textContent = s.project || "";
  document.getElementById("who").textContent =
    `${s.admin} (${s.role}, ${s.org}) on ${s.server}; your role may run: ${s.commands.join(", ")}`;
  document.body.dataset.role = s.role;
  document.getElementById("metric-select").addEventListener("change", (e) => {
    state.metric = e.target.value;
    if (state.job) renderJob();
  });
  document.getElementById("audit-refresh").addEventListener("click", loadAudit);
  document.getElementById("audit-hide-reads").addEventListener("change", loadAudit);
  window.addEventListener("hashchange", route);
  route();
  if (!state.source) connect();
}

start();
