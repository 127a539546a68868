# ruff: noqa: E501  (the page template below is HTML/CSS/JS, kept readable rather than wrapped)
"""The ``qevm report`` page: one self-contained HTML file (inline CSS and script, no network).

The report documents (``qevm.analysis.report.collect``) travel inside the page as JSON; a small
script draws the tables, the size chart (SVG), the RAM heat maps (one canvas per block, one cell per
aggregated region, never one element per page) and filters the device tree as you type.
"""

from __future__ import annotations

import html
import json
from typing import Any

__all__ = ["render"]


def _json_for_script(doc: Any) -> str:
    text = json.dumps(doc, separators=(",", ":"), default=str)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def render(docs: list[dict[str, Any]], diff: dict[str, Any] | None = None, version: str = "") -> str:
    """The page for one stream, or two with their comparison (``diff``: ``qevm.analysis.report.diff_view``)."""
    payload = {"docs": docs, "diff": diff, "version": version}
    title = " vs ".join(str(d["name"]).rsplit("/", 1)[-1] for d in docs)
    return (_PAGE.replace("%TITLE%", html.escape(f"qevm report: {title}"))
            .replace("%DATA%", _json_for_script(payload)))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
:root{--fg:#1d232a;--mut:#5d6875;--bg:#fff;--alt:#f4f6f8;--line:#d9dee3;--acc:#2363b5;--bad:#b3261e;--ok:#1b7f3b}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{padding:14px 24px;background:#14263d;color:#fff}
header h1{margin:0;font-size:19px;font-weight:600}
header .sub{color:#b9c6d6;font-size:12px}
nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);padding:6px 24px}
nav a{margin-right:16px;color:var(--acc);text-decoration:none;font-weight:500}
main{padding:8px 24px 40px}
section{margin:18px 0 28px}
h2{font-size:17px;margin:0 0 10px;border-bottom:2px solid var(--line);padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:24px}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0}
dl.kv dt{color:var(--mut)} dl.kv dd{margin:0;word-break:break-word}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:3px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--alt);position:sticky;top:37px;cursor:default;white-space:nowrap}
th.sort{cursor:pointer} th.sort:after{content:" \\2195";color:#9aa5b1}
th.asc:after{content:" \\2191";color:var(--acc)} th.desc:after{content:" \\2193";color:var(--acc)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.path{color:#36414d;word-break:break-all}
.val{word-break:break-all}
.note{color:#8a5a00;font-size:12px}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px;background:var(--alt);color:var(--mut)}
.yes{color:var(--ok)} .no{color:var(--bad)}
.block{margin:10px 0 18px;padding:8px 10px;border:1px solid var(--line);border-radius:6px}
.block canvas{display:block;image-rendering:pixelated;border:1px solid var(--line);margin-top:6px;max-width:100%}
.legend span{display:inline-block;margin-right:12px;font-size:12px}
.legend i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px;border:1px solid #0002}
.tip{position:fixed;pointer-events:none;background:#14263dee;color:#fff;padding:4px 8px;border-radius:4px;font-size:12px;display:none;z-index:10}
.ctl{margin:6px 0} .ctl label{margin-right:14px}
input[type=search]{width:min(640px,100%);padding:6px 10px;font-size:14px;border:1px solid var(--line);border-radius:6px}
details.dev{border:1px solid var(--line);border-radius:6px;margin:6px 0}
details.dev>summary{padding:5px 10px;cursor:pointer;background:var(--alt);font-weight:500}
details.dev table{margin:0}
.hidden{display:none}
mark{background:#ffe58a}
.chg td.a{background:#fdecea} .chg td.b{background:#e6f4ea}
svg text{font-size:11px;fill:var(--fg)} svg.sizechart{display:block;max-width:100%;height:auto;margin:4px 0 10px}
table.difffields td:first-child,table.diffsubs td:first-child{width:48%} table.difffields td.val{width:18%}
.scroll{max-height:460px;overflow:auto;border:1px solid var(--line);border-radius:6px} .scroll th{top:0}
</style></head>
<body>
<header><h1 id="title"></h1><div class="sub" id="subtitle"></div></header>
<nav><a href="#summary">Summary</a><a href="#sections">Sections</a><a href="#ram">RAM map</a><a href="#devices">Devices</a><a href="#diff" id="navdiff" class="hidden">Differences</a></nav>
<main>
<section id="summary"><h2>Summary</h2><div class="cols" id="summaries"></div></section>
<section id="diff" class="hidden"><h2>Differences</h2><div id="diffbody"></div></section>
<section id="sections"><h2>Sections</h2><div class="cols" id="sectionviews"></div></section>
<section id="ram"><h2>RAM map</h2>
<div class="ctl">Colour: <label><input type="radio" name="rammode" value="sent" checked> times sent (dirty heat map)</label><label><input type="radio" name="rammode" value="kind"> record kind</label></div>
<div class="cols" id="ramviews"></div></section>
<section id="devices"><h2>Devices</h2>
<input type="search" id="search" placeholder="Search fields: path, value or type (e.g. mac, last_avail_idx, vendor_id)" autocomplete="off">
<span id="searchinfo" class="badge"></span>
<div class="cols" id="deviceviews"></div></section>
</main>
<div class="tip" id="tip"></div>
<script type="application/json" id="qevm-data">%DATA%</script>
<script>
"use strict";
(function () {
const DATA = JSON.parse(document.getElementById("qevm-data").textContent);
const docs = DATA.docs, two = docs.length > 1;
const $ = (id) => document.getElementById(id);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  if (attrs) for (const k in attrs) {
    if (k === "text") e.textContent = attrs[k]; else if (k === "cls") e.className = attrs[k]; else e.setAttribute(k, attrs[k]);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}
function fmtBytes(n) {
  if (n == null) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0, v = n;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return i ? v.toFixed(1) + " " + u[i] : n + " B";
}
const num = (n) => n == null ? "" : Number(n).toLocaleString("en-US");
const short = (name) => String(name).split("/").pop();

$("title").textContent = "qevm report: " + docs.map((d) => short(d.name)).join("  vs  ");
$("subtitle").textContent = docs.map((d) => d.name).join("  |  ") + (DATA.version ? "   (qevm " + DATA.version + ")" : "");

/* summary */
for (const d of docs) {
  const s = d.summary, q = s.qemu || {};
  const qv = [q.min ? ">= " + q.min : "", q.max ? "<= " + q.max : ""].filter(Boolean).join(" and ") || "unknown";
  const rows = [
    ["stream", d.name], ["size", num(s.size) + " bytes (" + fmtBytes(s.size) + ")"],
    ["machine", s.machine || "(no configuration record)"], ["page size", s.page_size],
    ["QEMU", qv + (q.reasons && q.reasons.length ? " (" + q.reasons.join("; ") + ")" : "")],
    ["capabilities", (s.capabilities || []).join(", ") || "(none validated)"],
    ["vmdesc", s.vmdesc ? "yes, " + num(s.vmdesc_size) + " bytes" : "no"],
    ["devices", s.decoded_devices + " of " + s.device_sections + " device sections decoded"],
    ["commands", Object.entries(s.commands || {}).map(([k, v]) => k + " x" + v).join(", ") || "none"],
    ["RAM passes", d.ram.passes + " pass(es) over memory"],
  ];
  if (s.uuid) rows.push(["uuid", s.uuid]);
  if (s.trailing_bytes) rows.push(["trailing bytes", num(s.trailing_bytes)]);
  const dl = el("dl", {cls: "kv"});
  for (const [k, v] of rows) { dl.append(el("dt", {text: k}), el("dd", {text: String(v)})); }
  $("summaries").append(el("div", null, two ? el("h3", {text: short(d.name)}) : null, dl));
}

/* sortable tables */
function sortable(table) {
  const ths = table.tHead.rows[0].cells;
  for (let i = 0; i < ths.length; i++) {
    const th = ths[i]; th.classList.add("sort");
    th.addEventListener("click", () => {
      const asc = !th.classList.contains("asc");
      for (const o of ths) o.classList.remove("asc", "desc");
      th.classList.add(asc ? "asc" : "desc");
      const body = table.tBodies[0], rows = Array.from(body.rows);
      const key = (r) => { const c = r.cells[i]; return c.dataset.v !== undefined ? Number(c.dataset.v) : c.textContent.toLowerCase(); };
      rows.sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); });
      body.append(...rows);
    });
  }
}
function table(cols, rows, cls) {
  const t = el("table", cls ? {cls: cls} : null);
  const hr = el("tr");
  for (const c of cols) hr.append(el("th", {text: c.t, cls: c.num ? "num" : ""}));
  t.append(el("thead", null, hr));
  const tb = el("tbody");
  for (const r of rows) {
    const tr = el("tr");
    cols.forEach((c, i) => {
      const v = r[i];
      const td = el("td", {cls: (c.num ? "num " : "") + (c.cls || "")});
      if (c.num) { td.dataset.v = v == null ? -1 : v; td.textContent = c.fmt ? c.fmt(v) : num(v); }
      else if (v instanceof Node) td.append(v); else td.textContent = v == null ? "" : String(v);
      tr.append(td);
    });
    tb.append(tr);
  }
  t.append(tb);
  return t;
}

/* sections + size chart */
function sizeChart(secs) {
  const top = secs.slice().sort((a, b) => b.size - a.size).slice(0, 16);
  const max = Math.max(1, ...top.map((s) => s.size));
  const W = 620, rowH = 18, lab = 250, H = top.length * rowH + 6;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 " + W + " " + H); svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("class", "sizechart");
  top.forEach((s, i) => {
    const y = i * rowH + 3, w = Math.max(1, Math.sqrt(s.size / max) * (W - lab - 90));
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", lab - 6); t.setAttribute("y", y + 12); t.setAttribute("text-anchor", "end");
    t.textContent = (s.name.length > 38 ? "…" + s.name.slice(-37) : s.name) + (s.instance ? ":" + s.instance : "");
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", lab); r.setAttribute("y", y + 2); r.setAttribute("width", w); r.setAttribute("height", rowH - 5);
    r.setAttribute("fill", s.kind === "device" ? "#5b8fd6" : "#e0913a");
    const ti = document.createElementNS(ns, "title"); ti.textContent = s.name + ": " + num(s.size) + " bytes"; r.append(ti);
    const v = document.createElementNS(ns, "text");
    v.setAttribute("x", lab + w + 5); v.setAttribute("y", y + 12); v.textContent = fmtBytes(s.size);
    svg.append(t, r, v);
  });
  return el("div", null, el("div", {cls: "badge", text: "largest sections (bar length ~ sqrt(size); orange = live/RAM, blue = device)"}), svg);
}
for (const d of docs) {
  const total = d.sections.reduce((a, s) => a + s.size, 0) || 1;
  const rows = d.sections.map((s) => [s.id, s.name, s.instance, s.version, s.kind, s.chunks, s.size, Math.round(s.size * 10000 / total) / 100,
    s.kind === "device" ? (s.decoded ? "yes" : "no") : ""]);
  const t = table([{t: "id", num: 1}, {t: "section", cls: "mono"}, {t: "inst", num: 1}, {t: "ver", num: 1}, {t: "kind"},
    {t: "chunks", num: 1}, {t: "bytes", num: 1}, {t: "%", num: 1, fmt: (v) => v.toFixed(2)}, {t: "decoded"}], rows, "sections");
  t.id = "sectable-" + docs.indexOf(d);
  sortable(t);
  $("sectionviews").append(el("div", null, two ? el("h3", {text: short(d.name)}) : null, sizeChart(d.sections), el("div", {cls: "scroll"}, t)));
}

/* RAM map */
const KIND_COL = ["#3b78c2", "#d8dde3", "#8e5bd6", "#2e9c6a"], KIND_NAME = ["data", "zero", "XBZRLE", "compressed"];
function heat(t) { /* 0..1 -> pale yellow .. dark red */
  const stops = [[255, 244, 196], [253, 174, 97], [230, 85, 13], [140, 20, 20]];
  const x = Math.min(1, Math.max(0, t)) * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * f));
  return "rgb(" + c.join(",") + ")";
}
const tip = $("tip");
const canvases = [];
let maxRate = 1;
function drawBlock(cv, b, mode) {
  const n = b.sent.length, per = 64, cw = 9, ch = 9, rowsN = Math.max(1, Math.ceil(n / per));
  cv.width = Math.min(n, per) * cw; cv.height = rowsN * ch;
  const g = cv.getContext("2d"); g.clearRect(0, 0, cv.width, cv.height);
  for (let i = 0; i < n; i++) {
    let col;
    if (mode === "kind" && b.kinds) {
      let best = -1, bi = -1;
      for (let k = 0; k < 4; k++) if (b.kinds[k][i] > best) { best = b.kinds[k][i]; bi = k; }
      col = best > 0 ? KIND_COL[bi] : "#ffffff";
    } else {
      const r = b.sent[i] / cellPagesAt(b, i);
      col = b.sent[i] ? heat(maxRate > 1 ? (r - 1) / (maxRate - 1) : 0) : "#ffffff";
    }
    g.fillStyle = col; g.fillRect((i % per) * cw, Math.floor(i / per) * ch, cw - 1, ch - 1);
  }
}
function cellPagesAt(b, i) { return Math.max(1, Math.min(b.cell_pages, b.npages - i * b.cell_pages)); }
function ramView(d) {
  const box = el("div");
  if (two) box.append(el("h3", {text: short(d.name)}));
  const r = d.ram;
  box.append(el("div", {cls: "legend"},
    el("span", null, el("i", {style: "background:" + heat(0)}), "each page sent once"),
    el("span", null, el("i", {style: "background:" + heat(0.5)}), ""),
    el("span", null, el("i", {style: "background:" + heat(1)}), "sent most often (" + (d.ram.passes || 1) + " passes)"),
    el("span", null, el("i", {style: "background:#fff"}), "never sent"),
    ...KIND_NAME.map((k, i) => el("span", null, el("i", {style: "background:" + KIND_COL[i]}), k)),
    el("span", {cls: "badge", text: r.detail ? "record kinds per cell: gathered" : "record kinds per cell: not gathered (use --pages); heat map only"})));
  for (const b of r.blocks) {
    const p = b.pages;
    const cv = el("canvas", {"data-block": b.name});
    canvases.push([cv, b]);
    const div = el("div", {cls: "block ramblock"},
      el("div", null, el("b", {cls: "mono", text: b.name}), "  ", el("span", {cls: "badge", text: fmtBytes(b.size)}), "  ",
        el("span", {cls: "badge", text: "cell = " + b.cell_pages + " pages (" + fmtBytes(b.cell_pages * r.page_size) + ")"})),
      el("div", {cls: "mono", text: "data " + num(p.normal) + " · zero " + num(p.zero) + " · xbzrle " + num(p.xbzrle) + " · compressed " + num(p.compressed)}),
      cv);
    cv.addEventListener("mousemove", (e) => {
      const rect = cv.getBoundingClientRect(), sx = cv.width / rect.width, sy = cv.height / rect.height;
      const i = Math.floor((e.clientY - rect.top) * sy / 9) * 64 + Math.floor((e.clientX - rect.left) * sx / 9);
      if (i < 0 || i >= b.sent.length) { tip.style.display = "none"; return; }
      const lo = i * b.cell_pages * r.page_size, hi = Math.min(b.size, (i + 1) * b.cell_pages * r.page_size);
      let t = b.name + " 0x" + lo.toString(16) + "-0x" + (hi - 1).toString(16) + ": " + num(b.sent[i]) + " page sends (" +
        (b.sent[i] / cellPagesAt(b, i)).toFixed(2) + " per page)";
      if (b.kinds) t += "; records: " + KIND_NAME.map((k, j) => k + " " + b.kinds[j][i]).join(", ");
      tip.textContent = t; tip.style.display = "block"; tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px";
    });
    cv.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    box.append(div);
  }
  /* passes */
  if (r.pass_pages.length) {
    const rows = r.pass_pages.map((n, i) => [i + 1, n, n * r.page_size, r.pass_bytes[i] || 0]);
    const max = Math.max(1, ...rows.map((x) => x[3]));
    const bars = rows.map((x) => el("div", {title: "pass " + x[0] + ": " + fmtBytes(x[3]), style: "display:inline-block;vertical-align:bottom;width:" +
      Math.max(4, Math.floor(400 / rows.length)) + "px;margin-right:2px;background:#e0913a;height:" + Math.max(1, Math.round(60 * x[3] / max)) + "px"}));
    const t = table([{t: "pass", num: 1}, {t: "pages sent", num: 1}, {t: "page bytes", num: 1, fmt: fmtBytes}, {t: "bytes on the wire", num: 1, fmt: fmtBytes}], rows, "passes");
    box.append(el("h3", {text: "Bytes per pass over memory"}), el("div", {style: "height:64px"}, ...bars), t);
  }
  return box;
}
for (const d of docs) $("ramviews").append(ramView(d));
for (const [, b] of canvases) for (let i = 0; i < b.sent.length; i++) maxRate = Math.max(maxRate, b.sent[i] / cellPagesAt(b, i));
function redraw() {
  const mode = document.querySelector("input[name=rammode]:checked").value;
  for (const [cv, b] of canvases) drawBlock(cv, b, mode);
}
for (const r of document.querySelectorAll("input[name=rammode]")) r.addEventListener("change", redraw);
redraw();

/* device tree */
const allRows = [];
function devView(d, side) {
  const box = el("div");
  if (two) box.append(el("h3", {text: short(d.name)}));
  for (const dev of d.devices) {
    const tb = el("tbody");
    for (const r of dev.rows) {
      const tr = el("tr", null, el("td", {cls: "path mono", text: r[0]}), el("td", {cls: "mono", text: r[1]}),
        el("td", {cls: "val mono", text: r[2]}), el("td", {cls: "num", text: num(r[3])}), el("td", {cls: "num", text: num(r[4])}),
        el("td", {cls: "note", text: r[5] || ""}));
      tr.dataset.s = (r[0] + " " + r[1] + " " + r[2] + " " + (r[5] || "")).toLowerCase();
      tb.append(tr);
      allRows.push(tr);
    }
    const t = el("table", {cls: "fields"}, el("thead", null, el("tr", null, el("th", {text: "qevm edit path"}), el("th", {text: "type"}),
      el("th", {text: "value"}), el("th", {cls: "num", text: "offset"}), el("th", {cls: "num", text: "bytes"}), el("th", {text: "note"}))), tb);
    const det = el("details", {cls: "dev"}, el("summary", null, el("span", {cls: "mono", text: dev.path}), "  ",
      el("span", {cls: "badge", text: (dev.vmsd || "raw") + " · " + fmtBytes(dev.size) + " · " + dev.rows.length + " rows"})), t);
    det.dataset.side = side;
    box.append(det);
  }
  return box;
}
docs.forEach((d, i) => $("deviceviews").append(devView(d, i)));
const info = $("searchinfo");
info.textContent = allRows.length + " fields";
let timer = 0;
$("search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(search, 120); });
function search() {
  const q = $("search").value.trim().toLowerCase();
  let hits = 0;
  for (const det of document.querySelectorAll("details.dev")) {
    let any = false;
    for (const tr of det.querySelectorAll("tbody tr")) {
      const ok = !q || tr.dataset.s.includes(q);
      tr.classList.toggle("hidden", !ok);
      if (ok) { any = true; hits++; }
    }
    det.classList.toggle("hidden", !!q && !any);
    det.open = !!q && any;
  }
  info.textContent = q ? hits + " of " + allRows.length + " fields match" : allRows.length + " fields";
}

/* two states: qevm diff's document (qevm.analysis.diff), A and B side by side */
if (DATA.diff) {
  const df = DATA.diff, body = $("diffbody");
  $("diff").classList.remove("hidden"); $("navdiff").classList.remove("hidden");
  const a = short(docs[0].name), b = short(docs[1].name);
  const show = (v) => v == null ? "" : typeof v === "string" ? v : JSON.stringify(v);
  const secs = df.sections, fieldsShown = secs.reduce((n, s) => n + s.fields.length, 0);
  const blocks = df.ram ? df.ram.blocks : [];
  body.append(el("p", {cls: "badge", id: "diffverdict", text: df.equal ? "the two states are equal (qevm diff exits 0)" :
    "the states differ: " + df.configuration.length + " configuration keys, " + secs.length + " sections, " +
    num(df.fields_total) + " fields" + (df.ram ? ", " + blocks.length + " RAM blocks" : " (RAM not compared)")}));
  /* configuration */
  body.append(el("h3", {text: "Configuration (" + (df.configuration.length ? df.configuration.length + (df.configuration.length > 1 ? " keys differ" : " key differs") : "the same") + ")"}));
  if (df.configuration.length) body.append(table([{t: "key", cls: "mono"}, {t: a, cls: "val mono a"}, {t: b, cls: "val mono b"}],
    df.configuration.map((c) => [c.key, show(c.a), show(c.b)]), "chg diffconfig"));
  /* sections: one side only, versions */
  const secRows = secs.filter((s) => s.presence !== "both" || s.version[0] !== s.version[1]).map((s) => [s.section,
    s.presence === "only-b" ? "(absent)" : "version " + s.version[0], s.presence === "only-a" ? "(absent)" : "version " + s.version[1]]);
  body.append(el("h3", {text: "Sections on one side only or in another version (" + secRows.length + ")"}));
  if (secRows.length) { const t = table([{t: "section", cls: "mono"}, {t: a, cls: "a"}, {t: b, cls: "b"}], secRows, "chg diffsections"); sortable(t); body.append(t); }
  /* subsections */
  const subRows = [];
  for (const s of secs) for (const x of s.subsections) subRows.push([s.section + "/" + x.name, x.presence === "only-a" ? "sent" : "(absent)", x.presence === "only-b" ? "sent" : "(absent)"]);
  body.append(el("h3", {text: "Subsections on one side only (" + subRows.length + ")"}));
  if (subRows.length) body.append(table([{t: "qevm edit path", cls: "path mono"}, {t: a, cls: "a"}, {t: b, cls: "b"}], subRows, "chg diffsubs"));
  /* fields */
  const fRows = [];
  for (const s of secs) for (const f of s.fields) {
    let what = f.change;
    if (f.change === "bytes") what = "bytes " + (f.ranges || []).slice(0, 8).map((r) => "[0x" + r[0].toString(16) + ", 0x" + r[1].toString(16) + ")").join(" ") + ((f.ranges || []).length > 8 ? " …" : "");
    else if (f.change === "length") what = "elements";
    fRows.push([f.path, f.type, what, f.change === "only-b" ? "(absent)" : show(f.old), f.change === "only-a" ? "(absent)" : show(f.new)]);
  }
  body.append(el("h3", {text: "Device fields that differ (" + num(df.fields_total) + (df.fields_total > fieldsShown ? ", first " + num(fieldsShown) + " shown; qevm diff --json lists all" : "") + ")"}),
    el("input", {type: "search", id: "diffsearch", placeholder: "Filter differences by path, type or value", autocomplete: "off"}));
  const ft = table([{t: "qevm edit path", cls: "path mono"}, {t: "type", cls: "mono"}, {t: "change"}, {t: a, cls: "val mono a"}, {t: b, cls: "val mono b"}], fRows, "chg difffields");
  body.append(el("div", {cls: "scroll"}, ft));
  $("diffsearch").addEventListener("input", () => {
    const q = $("diffsearch").value.trim().toLowerCase();
    for (const tr of ft.tBodies[0].rows) tr.classList.toggle("hidden", !!q && !tr.textContent.toLowerCase().includes(q));
  });
  /* RAM */
  if (!df.ram) body.append(el("h3", {text: "RAM: not compared"}));
  else {
    const ps = df.ram.page_size;
    body.append(el("h3", {text: "RAM pages that differ (" + (blocks.length ? blocks.length + " blocks; " : "none; ") + ps + "-byte pages, compared by digest)"}));
    if (blocks.length) {
      const sz = (v) => v == null ? "(absent)" : fmtBytes(v);
      body.append(table([{t: "block", cls: "mono"}, {t: a + " size", cls: "a"}, {t: b + " size", cls: "b"}, {t: "changed", num: 1}, {t: "appeared (zero in " + a + ")", num: 1}, {t: "disappeared (zero in " + b + ")", num: 1}],
        blocks.map((x) => [x.block, sz(x.size[0]), sz(x.size[1]), x.pages_changed, x.pages_appeared, x.pages_disappeared]), "chg diffram"));
      const rr = [];
      for (const x of blocks) for (const r of x.ranges) rr.push([x.block, "0x" + r.start.toString(16), "0x" + r.end.toString(16), r.gpa == null ? "" : "0x" + r.gpa.toString(16), (r.end - r.start) / ps, r.change]);
      const more = blocks.reduce((n, x) => n + x.ranges_total - x.ranges.length, 0);
      body.append(el("h3", {text: "Page ranges (" + num(rr.length) + (more ? ", " + num(more) + " more not shown" : "") + ")"}),
        el("div", {cls: "scroll"}, table([{t: "block", cls: "mono"}, {t: "start", cls: "mono"}, {t: "end", cls: "mono"}, {t: "guest-physical", cls: "mono"}, {t: "pages", num: 1}, {t: "change"}], rr, "diffranges")));
    }
  }
  for (const n of df.notes || []) body.append(el("div", {cls: "note", text: "note: " + n}));
}
})();
</script>
</body></html>
"""
