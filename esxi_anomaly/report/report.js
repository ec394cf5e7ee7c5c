// Renders the esxi-anomaly report from the embedded JSON. Log text is hostile: every value
// reaches the page through textContent or setAttribute, never parsed as markup.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var SVGNS = "http://www.w3.org/2000/svg";

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVGNS, tag);
    for (var key in attrs) node.setAttribute(key, String(attrs[key]));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }
  function fmtTime(ts) {
    if (ts === null || ts === undefined) return "";
    var d = new Date(ts * 1000);
    if (isNaN(d.getTime())) return "";
    return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }
  function fmtNum(v, digits) {
    if (v === null || v === undefined || v === "") return "";
    return typeof v === "number" ? (digits === undefined ? String(v) : v.toFixed(digits)) : String(v);
  }
  function level(score) { return score >= 0.8 ? "hi" : (score >= 0.5 ? "mid" : "lo"); }
  function scoreCell(td, score) {
    if (score === null || score === undefined) return;
    var bar = el("span", "bar"), fill = el("div", level(score));
    fill.style.width = (Math.max(0, Math.min(1, score)) * 100).toFixed(1) + "%";
    bar.appendChild(fill);
    td.appendChild(bar);
    td.appendChild(el("span", "scoreval", score.toFixed(3)));
  }
  function formatValue(kind, v) {
    if (kind === "time") return fmtTime(v);
    if (kind === "float") return fmtNum(v, 2);
    if (kind === "score") return fmtNum(v, 3);
    return fmtNum(v);
  }
  function compare(a, b) {  // nulls and empty text always last
    var aEmpty = a === null || a === undefined || a === "", bEmpty = b === null || b === undefined || b === "";
    if (aEmpty || bEmpty) return aEmpty === bEmpty ? 0 : (aEmpty ? 1 : -1);
    if (typeof a === "number" && typeof b === "number") return a - b;
    a = String(a); b = String(b);
    return a < b ? -1 : (a > b ? 1 : 0);
  }

  // ---- summary --------------------------------------------------------------------------
  function renderSummary() {
    var s = DATA.summary, box = document.getElementById("summary");
    if (s.title) document.getElementById("title").textContent = s.title;
    document.getElementById("subtitle").textContent = s.subtitle || "";
    var cards = el("div", "cards");
    s.cards.forEach(function (c) {
      var card = el("div", "card");
      card.appendChild(el("div", "v", c[1]));
      card.appendChild(el("div", "k", c[0]));
      cards.appendChild(card);
    });
    box.appendChild(cards);
    var dl = el("dl", "kv");
    s.details.forEach(function (kv) { dl.appendChild(el("dt", "", kv[0])); dl.appendChild(el("dd", "", kv[1])); });
    if (s.details.length) box.appendChild(dl);
  }

  // ---- sortable table -------------------------------------------------------------------
  function makeTable(opts) {
    // opts: {table, columns: [{key,label,kind,cls}], rows: [[...]], index: {key: position},
    //        detail: function(row) -> node | null, onRow: function(row) | null}
    var thead = el("thead"), headRow = el("tr"), tbody = el("tbody");
    var items = opts.rows.map(function (row, order) {
      var tr = el("tr", opts.onRow ? "entity" : ""), item = {row: row, tr: tr, detail: null, order: order};
      var text = [];
      if (opts.detail) {
        var td0 = el("td"), button = el("button", "toggle", "+");
        button.type = "button";
        button.setAttribute("aria-expanded", "false");
        button.title = opts.detailTitle || "show why this row ranked here";
        button.addEventListener("click", function (ev) {
          ev.stopPropagation();
          if (item.detail) {
            item.detail.remove(); item.detail = null;
            button.textContent = "+"; button.setAttribute("aria-expanded", "false");
          } else {
            item.detail = el("tr", "detail");
            var td = el("td");
            td.colSpan = opts.columns.length + 1 + (opts.extra ? 1 : 0);
            td.appendChild(opts.detail(row));
            item.detail.appendChild(td);
            tr.after(item.detail);
            button.textContent = "\u2212"; button.setAttribute("aria-expanded", "true");
          }
        });
        td0.appendChild(button);
        tr.appendChild(td0);
      }
      if (opts.extra) tr.appendChild(opts.extra(row, order));
      opts.columns.forEach(function (c) {
        var v = row[opts.index[c.key]], td = el("td", c.cls || "");
        td.setAttribute("data-col", c.key);
        if (c.kind === "score") scoreCell(td, v);
        else td.textContent = formatValue(c.kind, v);
        if (c.cls && c.cls.indexOf("clip") >= 0 || c.cls === "why") td.title = td.textContent;
        text.push(td.textContent);
        tr.appendChild(td);
      });
      item.text = text.join("\u0001").toLowerCase();
      if (opts.onRow) tr.addEventListener("click", function () { opts.onRow(row); });
      tbody.appendChild(tr);
      return item;
    });
    if (opts.detail) headRow.appendChild(el("th", "", ""));
    if (opts.extra) headRow.appendChild(el("th", "", opts.extraLabel || ""));
    var state = {key: null, dir: 1};
    opts.columns.forEach(function (c) {
      var th = el("th", "", c.label);
      th.setAttribute("data-col", c.key);
      th.title = "sort by " + c.label;
      th.addEventListener("click", function () {
        state.dir = state.key === c.key ? -state.dir : (c.kind === "score" ? -1 : 1);
        state.key = c.key;
        headRow.querySelectorAll("th").forEach(function (h) { h.className = ""; });
        th.className = state.dir > 0 ? "sorted-asc" : "sorted-desc";
        var pos = opts.index[c.key];
        items.sort(function (a, b) {
          var av = a.row[pos], bv = b.row[pos];
          var aEmpty = av === null || av === undefined || av === "", bEmpty = bv === null || bv === undefined || bv === "";
          if (aEmpty || bEmpty) return aEmpty === bEmpty ? a.order - b.order : (aEmpty ? 1 : -1);
          return state.dir * compare(av, bv) || a.order - b.order;
        });
        items.forEach(function (it) { tbody.appendChild(it.tr); if (it.detail) tbody.appendChild(it.detail); });
      });
      headRow.appendChild(th);
    });
    thead.appendChild(headRow);
    opts.table.appendChild(thead);
    opts.table.appendChild(tbody);
    return items;
  }

  function detailFor(columns, index) {
    return function (row) {
      var dl = el("dl", "kv");
      columns.forEach(function (c) {
        var v = row[index[c.key]];
        var text = formatValue(c.kind, v);
        if (text === "") return;
        dl.appendChild(el("dt", "", c.label));
        dl.appendChild(el("dd", "", text));
      });
      return dl;
    };
  }

  // ---- ranked table ---------------------------------------------------------------------
  var filterBox = document.getElementById("filter"), countBox = document.getElementById("count");
  var rankedIndex = {};
  DATA.ranked.columns.forEach(function (c, i) { rankedIndex[c.key] = i; });
  var rankedItems = makeTable({
    table: document.getElementById("ranked"),
    columns: DATA.ranked.columns.filter(function (c) { return c.visible; }),
    rows: DATA.ranked.rows,
    index: rankedIndex,
    detail: detailFor(DATA.ranked.columns.filter(function (c) { return c.detail; }), rankedIndex),
    onRow: null
  });
  function applyFilter() {
    var needle = filterBox.value.trim().toLowerCase(), shown = 0;
    rankedItems.forEach(function (it) {
      var keep = needle === "" || it.text.indexOf(needle) >= 0;
      it.tr.hidden = !keep;
      if (it.detail) it.detail.hidden = !keep;
      if (keep) shown += 1;
    });
    countBox.textContent = shown + " of " + rankedItems.length + " rows";
  }
  filterBox.addEventListener("input", applyFilter);
  applyFilter();

  // ---- score histogram -------------------------------------------------------------------
  function renderHistogram() {
    var h = DATA.histogram, box = document.getElementById("histogram");
    if (!h || !h.counts.length) return;
    var W = 1000, H = 170, L = 56, R = 20, top = 14, bottom = H - 30, n = h.counts.length;
    var peak = Math.max.apply(null, h.counts.concat([1]));
    function x(v) { return L + (W - L - R) * v; }
    function y(c) { return c <= 0 ? bottom : bottom - (bottom - top) * Math.log10(1 + c) / Math.log10(1 + peak); }
    var s = svg("svg", {viewBox: "0 0 " + W + " " + H, width: "100%", role: "img", id: "score-histogram"});
    s.appendChild(svg("title", {}, "scores of all scored connections (log scale) and the alert level"));
    s.appendChild(svg("line", {x1: L, x2: W - R, y1: bottom, y2: bottom, stroke: "#8a94a3"}));
    [0, 0.2, 0.4, 0.6, 0.8, 1].forEach(function (v) {
      s.appendChild(svg("text", {x: x(v), y: bottom + 14, "text-anchor": "middle"}, v.toFixed(1)));
    });
    s.appendChild(svg("text", {x: L - 6, y: top + 8, "text-anchor": "end"}, String(peak)));
    s.appendChild(svg("text", {x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle"}, "score"));
    h.counts.forEach(function (c, i) {
      if (c <= 0) return;
      var g = svg("g", {"class": "bin"});
      var lo = i / n, hi = (i + 1) / n;
      g.appendChild(svg("rect", {x: x(lo) + 0.5, y: y(c), width: Math.max(1, x(hi) - x(lo) - 1), height: bottom - y(c),
        fill: h.level !== null && lo >= h.level ? "#c62828" : "#6b8fb3"}));
      g.appendChild(svg("title", {}, c + " connections scored " + lo.toFixed(2) + "\u2013" + hi.toFixed(2)));
      s.appendChild(g);
    });
    if (h.level !== null) {
      s.appendChild(svg("line", {x1: x(h.level), x2: x(h.level), y1: top - 6, y2: bottom, stroke: "#c62828",
        "stroke-dasharray": "4 3", id: "alert-level"}));
      s.appendChild(svg("text", {x: x(h.level) + 4, y: top + 2}, "alert level " + h.level.toFixed(3)));
    }
    box.appendChild(s);
  }

  // ---- incidents ----------------------------------------------------------------------
  var rowsOfIncident = {};
  (DATA.ranked.incident || []).forEach(function (id, i) {
    (rowsOfIncident[id] = rowsOfIncident[id] || []).push(i);
  });
  var incidents = DATA.incidents, incidentIndex = {}, verdicts = {};
  incidents.columns.forEach(function (c, i) { incidentIndex[c.key] = i; });
  var positionOf = new Map();
  incidents.rows.forEach(function (row, i) { positionOf.set(row, i); });

  function incidentDetail(row) {
    var i = positionOf.get(row), box = el("div", "incident-detail");
    var mine = rowsOfIncident[incidents.id[i]] || [], total = row[incidentIndex.connections];
    var cols = ["ts", "dst_ip", "dst_port", "answer", "score", "explanation"].filter(function (k) {
      return rankedIndex[k] !== undefined;
    });
    if (mine.length) {
      var table = el("table", "connections"), head = el("tr");
      cols.forEach(function (k) { head.appendChild(el("th", "", labelOf[k])); });
      table.appendChild(el("thead")).appendChild(head);
      var body = el("tbody");
      mine.forEach(function (r) {
        var tr = el("tr"), values = DATA.ranked.rows[r];
        cols.forEach(function (k) {
          var td = el("td", k === "explanation" ? "why" : "");
          td.textContent = formatValue(kindOf[k], values[rankedIndex[k]]);
          tr.appendChild(td);
        });
        body.appendChild(tr);
      });
      table.appendChild(body);
      box.appendChild(table);
    }
    var shown = mine.length, ids = incidents.events[i];
    box.appendChild(el("div", "legend", shown + " of " + total + " connections are in this report's ranked " +
      "table" + (shown < total ? "; every event id is in the incidents CSV (<out>.incidents.csv)" : "") + "."));
    if (shown < total && ids.length) {
      box.appendChild(el("div", "ids", "event ids: " + ids.slice(0, 200).join(" ") + (ids.length > 200 ? " \u2026" : "")));
    }
    return box;
  }
  var labelOf = {}, kindOf = {};
  DATA.ranked.columns.forEach(function (c) { labelOf[c.key] = c.label; kindOf[c.key] = c.kind; });

  function verdictCell(row, order) {
    var td = el("td", "verdict"), select = el("select");
    select.setAttribute("aria-label", "verdict for incident " + incidents.id[order]);
    select.setAttribute("data-incident", incidents.id[order]);
    [["", "\u2014"], ["malicious", "malicious"], ["benign", "benign"]].forEach(function (o) {
      var option = el("option", "", o[1]);
      option.value = o[0];
      select.appendChild(option);
    });
    select.addEventListener("click", function (ev) { ev.stopPropagation(); });
    select.addEventListener("change", function () {
      if (select.value) verdicts[order] = select.value; else delete verdicts[order];
      updateVerdictCount();
    });
    td.appendChild(select);
    return td;
  }
  var TRIGGERS = ["=", "+", "-", "@", "\t", "\r"];
  function csvCell(v) {   // formula-safe, as the CSV files of esxi-anomaly are (label --import-csv reads it so)
    v = v === null || v === undefined ? "" : String(v);
    if (v !== "" && TRIGGERS.indexOf(v.charAt(0)) >= 0) v = "'" + v;
    return /[",\r\n]/.test(v) ? "\"" + v.replace(/"/g, "\"\"") + "\"" : v;
  }
  function verdictLines() {
    var lines = ["event_id,verdict,note,src_ip,query,dst_port"];
    Object.keys(verdicts).map(Number).sort(function (a, b) { return a - b; }).forEach(function (i) {
      var row = incidents.rows[i], note = "incident " + incidents.id[i];
      incidents.events[i].forEach(function (eventId, k) {
        lines.push([eventId, verdicts[i], note, row[incidentIndex.src_ip], incidents.queries[i],
          incidents.ports[i][k] || ""].map(csvCell).join(","));
      });
    });
    return lines;
  }
  function updateVerdictCount() {
    var marked = Object.keys(verdicts).length;
    document.getElementById("verdict-count").textContent = marked + " incident" + (marked === 1 ? "" : "s") +
      " marked, " + (verdictLines().length - 1) + " verdict lines";
  }
  document.getElementById("download-verdicts").addEventListener("click", function () {
    var link = el("a");   // a data: link: no object URL to revoke, nothing fetched
    link.href = "data:text/csv;charset=utf-8," + encodeURIComponent(verdictLines().join("\r\n") + "\r\n");
    link.download = "verdicts.csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
  });
  makeTable({
    table: document.getElementById("incidents"),
    columns: incidents.columns,
    rows: incidents.rows,
    index: incidentIndex,
    detail: incidentDetail,
    detailTitle: "show this incident's connections",
    extra: verdictCell,
    extraLabel: "Verdict",
    onRow: null
  });
  if (!incidents.rows.length) {
    document.getElementById("incidents").after(el("p", "empty", "No incidents (no scored rows)."));
  }
  updateVerdictCount();
  renderHistogram();

  // ---- entity roll-up -------------------------------------------------------------------
  var entityIndex = {};
  DATA.entities.columns.forEach(function (c, i) { entityIndex[c.key] = i; });
  makeTable({
    table: document.getElementById("entities"),
    columns: DATA.entities.columns,
    rows: DATA.entities.rows,
    index: entityIndex,
    detail: null,
    onRow: function (row) {
      filterBox.value = row[entityIndex.src_ip];
      applyFilter();
      document.getElementById("ranked-section").scrollIntoView();
    }
  });

  // ---- timelines ------------------------------------------------------------------------
  function renderTimeline(t, box) {
    var W = 1000, H = 200, L = 56, R = 20, dnsY = 22, top = 44, bottom = H - 26;
    var x0 = t.start, x1 = t.end;
    function x(ts) { return L + (W - L - R) * (ts - x0) / Math.max(1e-9, x1 - x0); }
    function y(port) { return bottom - (bottom - top) * Math.log10(Math.max(1, port)) / Math.log10(65535); }
    var s = svg("svg", {viewBox: "0 0 " + W + " " + H, width: "100%", role: "img"});
    s.appendChild(svg("title", {}, "connections and DNS answers of " + t.name + " around its top anomaly"));
    s.appendChild(svg("text", {x: L - 6, y: dnsY + 3, "text-anchor": "end"}, "DNS"));
    s.appendChild(svg("line", {x1: L, x2: W - R, y1: dnsY, y2: dnsY, stroke: "#d9dee6"}));
    [[1, "1"], [10, "10"], [100, "100"], [1000, "1k"], [10000, "10k"], [65535, "65535"]].forEach(function (p) {
      s.appendChild(svg("line", {x1: L, x2: W - R, y1: y(p[0]), y2: y(p[0]), stroke: "#e6e9ee"}));
      s.appendChild(svg("text", {x: L - 6, y: y(p[0]) + 3, "text-anchor": "end"}, p[1]));
    });
    s.appendChild(svg("text", {x: 12, y: (top + bottom) / 2, transform: "rotate(-90 12 " + (top + bottom) / 2 + ")",
      "text-anchor": "middle"}, "dst port"));
    for (var i = 0; i <= 4; i++) {
      var ts = x0 + (x1 - x0) * i / 4;
      s.appendChild(svg("text", {x: x(ts), y: H - 8, "text-anchor": i === 0 ? "start" : (i === 4 ? "end" : "middle")},
        fmtTime(ts).slice(11)));
    }
    s.appendChild(svg("line", {x1: x(t.top_ts), x2: x(t.top_ts), y1: 12, y2: bottom, stroke: "#c62828",
      "stroke-dasharray": "3 3"}));
    t.dns.forEach(function (d) {  // [ts, query, rtype, answer]
      var g = svg("g", {});
      g.appendChild(svg("rect", {x: x(d[0]) - 3.5, y: dnsY - 3.5, width: 7, height: 7, fill: "#6a4fb3",
        transform: "rotate(45 " + x(d[0]) + " " + dnsY + ")"}));
      g.appendChild(svg("title", {}, fmtTime(d[0]) + "  " + d[1] + "  " + d[2] + " " + d[3]));
      s.appendChild(g);
    });
    var colours = {hi: "#c62828", mid: "#ef8f00", lo: "#6b8fb3"};
    t.connections.forEach(function (c) {  // [ts, dst_ip, dst_port, score, is_top, event_id]
      var g = svg("g", {});
      var fill = c[3] === null ? "#b0b7c3" : colours[level(c[3])];
      g.appendChild(svg("circle", {cx: x(c[0]), cy: y(c[2]), r: c[4] ? 6 : 3.5, fill: fill,
        stroke: c[4] ? "#1d2430" : "none", "stroke-width": 1.5, "fill-opacity": 0.85}));
      g.appendChild(svg("title", {}, fmtTime(c[0]) + "  \u2192 " + c[1] + ":" + c[2] +
        (c[3] === null ? "" : "  score " + c[3].toFixed(3)) + (c[5] ? "  " + c[5] : "")));
      s.appendChild(g);
    });
    box.appendChild(s);
  }
  var tlBox = document.getElementById("timelines");
  if (!DATA.timelines.length) tlBox.appendChild(el("p", "empty", "No timelines (no scored rows)."));
  DATA.timelines.forEach(function (t, i) {
    var box = el("div", "timeline");
    box.id = "tl-" + i;
    box.appendChild(el("h3", "", t.name + "  (" + t.ip + ")  \u2014  top score " + fmtNum(t.score, 3) +
      " at " + fmtTime(t.top_ts)));
    box.appendChild(el("div", "why", t.explanation));
    renderTimeline(t, box);
    if (t.truncated) box.appendChild(el("div", "legend", "Showing the " + t.connections.length +
      " connections and " + t.dns.length + " DNS answers nearest the top anomaly."));
    tlBox.appendChild(box);
  });
  renderSummary();
}());
