// The budget page: reads /v1/stats (live through /v1/events), /v1/spend and /v1/alerts. No framework, no build.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const usd = (v) => {
    const n = Number(v || 0), d = Math.abs(n) > 0 && Math.abs(n) < 1 ? 4 : 2;
    return "$" + n.toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d });
  };
  const usd4 = (v) => "$" + Number(v || 0).toFixed(4);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
    }
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  };
  const svg = (tag, attrs) => {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  };

  // The admin token, when the listener asks for one: from the URL fragment (#token=...) or the form; kept for
  // this tab only.
  const frag = new URLSearchParams(location.hash.slice(1));
  if (frag.get("token")) { sessionStorage.setItem("nexus-token", frag.get("token")); history.replaceState(null, "", location.pathname); }
  const headers = () => {
    const t = sessionStorage.getItem("nexus-token");
    return t ? { Authorization: "Bearer " + t } : {};
  };
  async function get(path) {
    const r = await fetch(path, { headers: headers() });
    if (r.status === 401) { $("login").classList.add("show"); throw new Error("unauthorized"); }
    if (!r.ok) throw new Error(path + ": " + r.status);
    return r.json();
  }
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("nexus-token", $("token").value);
    $("login").classList.remove("show");
    start();
  });

  function gauge(pct, status) {
    const s = svg("svg", { width: 120, height: 70, viewBox: "0 0 120 70" });
    const arc = (p) => {
      const a = Math.PI * (1 - Math.min(Math.max(p, 0), 100) / 100);
      return `M10 60 A50 50 0 0 1 ${60 + 50 * Math.cos(a)} ${60 - 50 * Math.sin(a)}`;
    };
    s.append(svg("path", { d: arc(100), stroke: "#262b36", "stroke-width": 10, fill: "none" }));
    const color = { Normal: "#3fb950", SoftLimit: "#d29922", HardLimit: "#f85149" }[status] || "#58a6ff";
    if (pct > 0) s.append(svg("path", { d: arc(pct), stroke: color, "stroke-width": 10, fill: "none" }));
    const t = svg("text", { x: 60, y: 58, "text-anchor": "middle" });
    t.textContent = pct.toFixed(1) + "%";
    t.setAttribute("style", "font-size:16px;fill:#e7e9ee");
    s.append(t);
    return s;
  }

  // Cumulative spend over the period's days, the limit as a line, and the forecast band to the period's end.
  function chart(days, limit, fc) {
    const W = 380, H = 120, P = 24;
    const s = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
    let cum = 0;
    const pts = days.map(([d, c]) => [d, (cum += c)]);
    const eop = fc && fc.end_of_period ? fc.end_of_period : null;
    const top = Math.max(limit, cum, eop ? eop.high_usd : 0) * 1.1 || 1;
    const n = Math.max(pts.length + (eop ? Math.ceil(eop.days) : 0), 2);
    const x = (i) => P + (i * (W - 2 * P)) / (n - 1);
    const y = (v) => H - P - (v * (H - 2 * P)) / top;
    s.append(svg("line", { x1: P, x2: W - P, y1: y(limit), y2: y(limit), stroke: "#f85149", "stroke-dasharray": "4 3" }));
    const lt = svg("text", { x: W - P, y: y(limit) - 4, "text-anchor": "end" }); lt.textContent = "limit " + usd(limit); s.append(lt);
    if (eop && pts.length) {
      const i0 = pts.length - 1, i1 = n - 1;
      s.append(svg("polygon", { points: `${x(i0)},${y(cum)} ${x(i1)},${y(eop.high_usd)} ${x(i1)},${y(eop.low_usd)}`, fill: "rgba(88,166,255,.18)" }));
      s.append(svg("line", { x1: x(i0), y1: y(cum), x2: x(i1), y2: y(eop.point_usd), stroke: "#58a6ff", "stroke-dasharray": "3 3" }));
    }
    if (pts.length) s.append(svg("polyline", { points: pts.map(([, v], i) => `${x(i)},${y(v)}`).join(" "), fill: "none", stroke: "#58a6ff", "stroke-width": 2 }));
    pts.forEach(([d, v], i) => { const c = svg("circle", { cx: x(i), cy: y(v), r: 3, fill: "#58a6ff" }); const t = svg("title", {}); t.textContent = `${d}: ${usd(v)}`; c.append(t); s.append(c); });
    if (pts.length) { const a = svg("text", { x: P, y: H - 6 }); a.textContent = pts[0][0]; s.append(a); }
    return s;
  }

  let spendByBudgetDay = {};
  let lastReports = Date.now();

  function renderBudgets(stats) {
    const box = $("budgets");
    box.replaceChildren();
    for (const b of stats.budgets || []) {
      const fc = b.forecasts || {};
      const hz = (fc.horizons || []).map((h) => `${h.days} d: ${usd(h.point_usd)} (${usd(h.low_usd)}–${usd(h.high_usd)})`);
      const hhmm = (iso) => new Date(iso).toISOString().slice(11, 16) + "Z";
      // A token budget counts tokens, and a short window has no calendar period to chart or forecast.
      const tok = (n) => `${Number(n || 0).toLocaleString("en-US")} tokens`;
      const kv = b.unit === "tokens" || b.window ? el("dl", { class: "kv" },
        el("dt", {}, "spent"), el("dd", { "data-testid": "spent", "data-budget": b.name },
          b.unit === "tokens" ? tok(b.current_tokens) : usd4(b.current_spending_usd)),
        el("dt", {}, "limit"), el("dd", { "data-testid": "limit", "data-budget": b.name },
          b.unit === "tokens" ? tok(b.limit_tokens) : usd(b.limit_usd)),
        el("dt", {}, "reserved"), el("dd", {}, b.unit === "tokens" ? tok(b.reserved_tokens) : usd4(b.reserved_usd)),
        el("dt", {}, b.window ? "window" : "resets"), el("dd", { "data-testid": "window", "data-budget": b.name },
          b.window ? `${b.period}: ${hhmm(b.window.start)}–${hhmm(b.window.end)}` : b.next_reset_date))
      : el("dl", { class: "kv" },
        el("dt", {}, "spent"), el("dd", { "data-testid": "spent", "data-budget": b.name }, usd4(b.current_spending_usd)),
        el("dt", {}, "limit"), el("dd", { "data-testid": "limit", "data-budget": b.name }, usd(b.limit_usd)),
        el("dt", {}, "reserved"), el("dd", {}, usd4(b.reserved_usd)),
        el("dt", {}, "period end"), el("dd", {}, fc.end_of_period ? `${usd(fc.end_of_period.point_usd)} (80 %: ${usd(fc.end_of_period.low_usd)}–${usd(fc.end_of_period.high_usd)})` : "–"),
        el("dt", {}, "trend"), el("dd", { "data-testid": "trend", "data-budget": b.name }, fc.trend || "–"),
        el("dt", {}, "ahead"), el("dd", { class: "muted" }, hz.join(" · ") || "–"),
        el("dt", {}, "resets"), el("dd", {}, b.next_reset_date));
      const tags = el("span", {},
        el("span", { class: "tag" }, b.period), " ",
        el("span", { class: "tag" }, b.active === false ? "inactive" : b.hard_limit_action), " ",
        el("span", { class: "tag" }, b.origin || "config"));
      const sec = el("section", { "data-testid": "budget", "data-budget": b.name },
        el("h2", {}, el("span", {}, b.name, " ", el("span", { class: b.status, "data-testid": "status", "data-budget": b.name }, b.status)), tags),
        el("div", { class: "row" }, gauge(b.utilization_percent, b.status), kv));
      sec.querySelector("svg").setAttribute("data-testid", "gauge");
      sec.querySelector("svg").setAttribute("data-utilization", String(b.utilization_percent));
      if (b.unit !== "tokens" && !b.window) sec.append(chart(spendByBudgetDay[b.name] || [], b.limit_usd, fc));
      if (b.distinct) {
        const t = el("table", {}, el("tr", {}, el("th", {}, (b.distinct.by || []).join("+")), el("th", { class: "num" }, "spent"), el("th", { class: "num" }, "used"), el("th", {}, "status")));
        for (const i of b.distinct.top.slice(0, 8)) {
          t.append(el("tr", {}, el("td", {}, i.value), el("td", { class: "num" }, usd4(i.current_spending_usd)), el("td", { class: "num" }, i.utilization_percent + "%"), el("td", { class: i.status }, i.status)));
        }
        sec.append(el("p", { class: "muted" }, `${b.distinct.instances} of at most ${b.distinct.max_instances} instances, ${usd(b.distinct.instance_limit_usd)} each`), t);
      }
      box.append(sec);
    }
  }

  function bars(target, rows, key) {
    const max = Math.max(...rows.map((r) => Number(r.cost_usd)), 0) || 1;
    const t = el("table", {}, el("tr", {}, el("th", {}, key), el("th", { class: "num" }, "requests"), el("th", { class: "num" }, "cost"), el("th", {}, "")));
    for (const r of rows.sort((a, b) => b.cost_usd - a.cost_usd).slice(0, 12)) {
      const bar = el("div", { class: "bar" }); bar.style.width = (100 * Number(r.cost_usd) / max) + "%";
      t.append(el("tr", { "data-testid": "row-" + key, "data-key": r[key] || "(none)" }, el("td", {}, r[key] || "(none)"), el("td", { class: "num" }, r.requests), el("td", { class: "num" }, usd4(r.cost_usd)), el("td", { style: "width:35%" }, bar)));
    }
    $(target).replaceChildren(rows.length ? t : el("p", { class: "muted" }, "no spend yet"));
  }

  async function refreshReports() {
    const [byModel, byTeam, byTask, byAgent, byDay, rer, alerts] = await Promise.all([
      get("/v1/spend?group_by=model"), get("/v1/spend?group_by=team"), get("/v1/spend?group_by=task"),
      get("/v1/spend?group_by=agent"),
      get("/v1/spend?group_by=budget,day"), get("/v1/spend?group_by=model_requested,model"), get("/v1/alerts?limit=10")]);
    bars("by-model", byModel.rows, "model");
    bars("by-team", byTeam.rows, "team");
    bars("by-task", byTask.rows, "task");
    bars("by-agent", byAgent.rows, "agent");
    spendByBudgetDay = {};
    for (const r of byDay.rows) (spendByBudgetDay[r.budget] = spendByBudgetDay[r.budget] || []).push([r.day, Number(r.cost_usd)]);
    const rr = rer.rows.filter((r) => Number(r.avoided_usd) > 0);
    const t = el("table", {}, el("tr", {}, el("th", {}, "asked"), el("th", {}, "served by"), el("th", { class: "num" }, "requests"), el("th", { class: "num" }, "avoided")));
    for (const r of rr) t.append(el("tr", { "data-testid": "reroute" }, el("td", {}, r.model_requested), el("td", {}, r.model), el("td", { class: "num" }, r.requests), el("td", { class: "num", "data-testid": "avoided" }, usd4(r.avoided_usd))));
    $("reroutes").replaceChildren(rr.length ? t : el("p", { class: "muted" }, "no reroutes yet"));
    const a = el("table", {}, el("tr", {}, el("th", {}, "when"), el("th", {}, "budget"), el("th", {}, "threshold"), el("th", {}, "delivery"), el("th", {}, "ack")));
    for (const x of alerts.alerts) a.append(el("tr", { "data-testid": "alert" }, el("td", {}, new Date(x.ts * 1000).toISOString().slice(0, 16).replace("T", " ")), el("td", {}, x.budget), el("td", {}, x.threshold === "forecast" ? "forecast" : x.threshold + "%"), el("td", {}, x.delivery), el("td", {}, x.acked_by || "")));
    $("alerts").replaceChildren(alerts.alerts.length ? a : el("p", { class: "muted" }, "no alerts"));
  }

  // Server-Sent Events over fetch (EventSource cannot send the Authorization header).
  async function stream() {
    const r = await fetch("/v1/events", { headers: headers() });
    if (!r.ok || !r.body) throw new Error("events: " + r.status);
    $("live").textContent = "live"; $("live").classList.add("on");
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
        const data = chunk.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue;
        const stats = JSON.parse(data);
        if (!stats.error) {
          renderBudgets(stats);
          document.body.setAttribute("data-updated", String(Date.now()));
          // The spend tables read reports (months of settlements on Redis): at most every 30 s, not per event.
          if (Date.now() - lastReports > 30000) { lastReports = Date.now(); refreshReports().catch(() => {}); }
        }
      }
    }
  }

  async function start() {
    try {
      await refreshReports();
      renderBudgets(await get("/v1/stats"));
      document.body.setAttribute("data-ready", "1");
      for (;;) {
        try { await stream(); } catch (e) { if (String(e).includes("unauthorized")) return; }
        $("live").textContent = "reconnecting…"; $("live").classList.remove("on");
        await new Promise((res) => setTimeout(res, 2000));
      }
    } catch (e) {
      $("live").textContent = String(e.message || e);
    }
  }
  start();
})();
