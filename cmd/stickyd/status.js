"use strict";
// The status page's only script: polls /admin/status and updates the page in place.
(function () {
  const COLORS = ["#2e90fa", "#12b76a", "#f79009", "#ee46bc", "#7a5af8", "#f04438", "#06aed4", "#66c61c"];
  const $ = (id) => document.getElementById(id);
  const fmt = (n) => (n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US"));
  const rate = (n) => (n >= 100 ? Math.round(n).toString() : n >= 10 ? n.toFixed(1) : n.toFixed(2));

  function dur(s) {
    if (s === null || s === undefined) return "–";
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${sec}s`;
    return `${sec}s`;
  }

  function setText(id, v) {
    const el = $(id);
    if (el.textContent !== v) el.textContent = v;
  }

  const SVGNS = "http://www.w3.org/2000/svg";
  function svgEl(name, attrs) {
    const e = document.createElementNS(SVGNS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  // chart draws series (arrays of numbers, -1 = no value) over times t into an svg.
  function chart(svg, t, series, label) {
    const W = 300, H = 90, top = 10;
    let maxV = 0;
    for (const s of series) for (const v of s.values) if (v > maxV) maxV = v;
    const ceil = maxV > 0 ? maxV * 1.1 : 1;
    svg.replaceChildren();
    for (const f of [0, 0.5, 1]) {
      const y = top + (H - top) * f;
      svg.appendChild(svgEl("line", { x1: 0, x2: W, y1: y, y2: y, class: "grid" }));
    }
    const lbl = svgEl("text", { x: 2, y: 8 });
    lbl.textContent = "max " + (label || rate)(maxV);
    svg.appendChild(lbl);
    if (t.length < 2) return;
    const t0 = t[0], span = Math.max(1, t[t.length - 1] - t0);
    for (const s of series) {
      const pts = [];
      s.values.forEach((v, i) => {
        if (v < 0) return;
        const x = ((t[i] - t0) / span) * W;
        const y = top + (H - top) * (1 - v / ceil);
        pts.push(x.toFixed(1) + "," + y.toFixed(1));
      });
      svg.appendChild(svgEl("polyline", { points: pts.join(" "), stroke: s.color }));
    }
  }

  function render(d) {
    const e = d.edge;
    const ready = $("edge-ready");
    ready.textContent = e.ready ? "ready" : "not ready";
    ready.className = "pill " + (e.ready ? "ok" : "bad");
    setText("edge-version", e.version + (e.commit ? " (" + e.commit.slice(0, 7) + ")" : ""));
    setText("edge-generation", String(e.generation));
    setText("edge-pid", String(e.pid));
    setText("edge-uptime", dur(e.uptime_seconds));
    setText("edge-sessions", fmt(e.sessions));
    setText("edge-fds", fmt(e.open_fds));
    let conns = 0;
    const by = [];
    for (const k of Object.keys(e.connections).sort()) {
      conns += e.connections[k];
      if (e.connections[k] > 0) by.push(k.replace("_", " ") + " " + fmt(e.connections[k]));
    }
    setText("edge-conns", fmt(conns));
    setText("edge-conns-by", by.join(" · ") || "\u00a0");
    setText("edge-handoffs", fmt(e.handoffs));
    setText("edge-requests", fmt(e.requests));

    // Workers: one row per slot, kept and updated in place.
    const tbody = $("workers").tBodies[0];
    const seen = new Set();
    for (const w of d.workers) {
      const key = (w.pool || "") + "/" + w.slot;
      seen.add(key);
      let tr = tbody.querySelector(`tr[data-key="${CSS.escape(key)}"]`);
      if (!tr) {
        tr = document.createElement("tr");
        tr.dataset.key = key;
        tr.dataset.slot = w.slot;
        for (const k of ["pool", "slot", "pid", "state", "sessions", "websockets", "handoffs", "requests", "in_flight", "restarts", "uptime"]) {
          const td = document.createElement("td");
          td.dataset.k = k;
          tr.appendChild(td);
        }
        const next = [...tbody.rows].find((r) => Number(r.dataset.slot) > w.slot);
        tbody.insertBefore(tr, next || null);
      }
      const cell = (k) => tr.querySelector(`td[data-k="${k}"]`);
      const put = (k, v) => { const c = cell(k); if (c.textContent !== v) c.textContent = v; };
      put("pool", w.pool || "default");
      put("slot", String(w.slot));
      put("pid", String(w.pid));
      put("state", w.state);
      cell("state").className = "state-" + w.state;
      put("sessions", fmt(w.sessions));
      put("websockets", fmt(w.websockets));
      put("handoffs", fmt(w.handoffs));
      put("requests", fmt(w.requests));
      put("in_flight", fmt(w.in_flight));
      put("restarts", fmt(w.restarts));
      put("uptime", dur(w.uptime_seconds));
    }
    for (const tr of [...tbody.rows]) if (!seen.has(tr.dataset.key)) tr.remove();
    setText("workers-count", d.workers.length + (d.workers.length === 1 ? " worker" : " workers"));

    const rej = $("rejections").tBodies[0];
    const reasons = Object.keys(e.rejections).sort((a, b) => e.rejections[b] - e.rejections[a]);
    rej.replaceChildren();
    if (!reasons.length) {
      const tr = rej.insertRow();
      const td = tr.insertCell();
      td.className = "muted";
      td.textContent = "none";
    }
    for (const r of reasons) {
      const tr = rej.insertRow();
      tr.dataset.reason = r;
      tr.insertCell().textContent = r.replace(/_/g, " ");
      tr.insertCell().textContent = fmt(e.rejections[r]);
    }

    const h = d.history;
    const last = (a) => (a && a.length ? a[a.length - 1] : 0);
    setText("rate-handoffs", rate(last(h.handoffs_per_second)));
    setText("rate-requests", rate(last(h.requests_per_second)));
    chart($("chart-handoffs"), h.t || [], [{ values: h.handoffs_per_second || [], color: COLORS[0] }]);
    chart($("chart-requests"), h.t || [], [{ values: h.requests_per_second || [], color: COLORS[1] }]);
    const slots = Object.keys(h.sessions || {}).sort((a, b) => a - b);
    chart($("chart-sessions"), h.t || [], slots.map((s, i) => ({ values: h.sessions[s], color: COLORS[i % COLORS.length] })), fmt);
    const legend = $("sessions-legend");
    legend.replaceChildren();
    slots.forEach((s, i) => {
      const dot = document.createElement("span");
      dot.className = "dot";
      dot.style.background = COLORS[i % COLORS.length];
      legend.append(dot, document.createTextNode(s));
    });
  }

  let updates = 0;
  async function poll() {
    try {
      const r = await fetch("/admin/status", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const d = await r.json();
      render(d);
      updates++;
      document.body.dataset.state = "live";
      document.body.dataset.updates = String(updates);
      setText("live", "updated " + new Date(d.now).toLocaleTimeString());
    } catch (err) {
      document.body.dataset.state = "error";
      setText("live", "no answer from the edge (" + err.message + "); retrying");
    }
    setTimeout(poll, 2000);
  }
  poll();
})();
