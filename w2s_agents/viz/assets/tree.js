/* w2s-agents trajectory-tree viewer. Offline, self-contained: reads the JSON data embedded in the page
 * (the element of id "w2s-data", of type application/json) and builds the page with DOM calls. Every text that comes
 * from environments or models is set with textContent, never parsed as markup.
 *
 * The tree is an outline of rows. Only expanded nodes are listed (the "visible" list), and only the rows of
 * that list inside the viewport exist in the DOM (a recycled pool of row elements), so a tree of any size
 * costs the same to draw; expanding everything or searching costs one pass over the nodes.
 *
 * Nodes whose actions reached the same game state (D.state_group >= 0) carry a badge of their state group; a best
 * path may jump between branches (a loop-erased or stitched path: a node whose predecessor on the path is not its
 * parent, but a node in the same state as its parent), so every ancestor of every best-path node is expanded.
 *
 * One file on purpose: the page inlines it whole under a Content-Security-Policy hash (no module loading offline),
 * and its parts share the page's state (visible list, row pool, selection).
 */
(function () {
  "use strict";

  var t0 = performance.now();
  var D = JSON.parse(document.getElementById("w2s-data").textContent);
  var M = D.meta;
  var N = D.n;
  var S = D.strings;
  var ROW = 22; // row height in pixels (kept in step with .row in viewer.css)
  var OVERSCAN = 8;

  // ------------------------------------------------------------------------------------------ helpers

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function append(parent) {
    for (var i = 1; i < arguments.length; i++) {
      if (arguments[i]) parent.appendChild(arguments[i]);
    }
    return parent;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || v !== v) return "\u2013";
    return Number(v).toFixed(digits === undefined ? 3 : digits);
  }
  function oneLine(s, limit) {
    s = String(s).replace(/\s+/g, " ").trim();
    return s.length > limit ? s.slice(0, limit - 1) + "\u2026" : s;
  }

  // ------------------------------------------------------------------------------------ tree structure

  var parent = Int32Array.from(D.parent);
  var depth = new Int32Array(N);
  var nkids = new Int32Array(N);
  var i, j, k;
  for (i = 1; i < N; i++) nkids[parent[i]]++;
  var kidStart = new Int32Array(N + 1);
  for (i = 0; i < N; i++) kidStart[i + 1] = kidStart[i] + nkids[i];
  var kidIds = new Int32Array(Math.max(N - 1, 0));
  var fill = kidStart.slice(0, N);
  for (i = 1; i < N; i++) kidIds[fill[parent[i]]++] = i; // ascending ids = canonical order
  // depths: parents come before children in canonical preorder; resolve any other order too
  var known = new Uint8Array(N);
  known[0] = 1;
  for (i = 1; i < N; i++) {
    if (known[i]) continue;
    var chain = [];
    j = i;
    while (!known[j]) {
      chain.push(j);
      j = parent[j];
    }
    for (k = chain.length - 1; k >= 0; k--) {
      depth[chain[k]] = depth[parent[chain[k]]] + 1;
      known[chain[k]] = 1;
    }
  }

  // sources: model indices of each node (and counts)
  var models = D.models;
  function sourceCounts(n) {
    var s = D.src[n];
    if (typeof s === "number") return [[s, D.visits[n]]];
    var out = [];
    for (var q = 0; q < s.length; q += 2) out.push([s[q], s[q + 1]]);
    return out;
  }
  // outcome of the trajectories that ended at a node: 0 none, 1 won, 2 failed, 3 mixed
  var outcome = new Uint8Array(N);
  Object.keys(D.terminal).forEach(function (key) {
    var t = D.terminal[key];
    var won = t.won || 0;
    var total = 0;
    Object.keys(t).forEach(function (name) { total += t[name]; });
    outcome[+key] = won === total ? 1 : won > 0 ? 3 : 2;
  });

  // best paths and pairs; jumpFrom: the node before a best-path node on its path where that is not its parent
  var best = new Uint8Array(N);
  var jumpFrom = new Int32Array(N).fill(-1);
  D.best_paths.forEach(function (p) {
    p.forEach(function (n, idx) {
      best[n] = 1;
      if (idx && parent[n] !== p[idx - 1] && jumpFrom[n] < 0) jumpFrom[n] = p[idx - 1];
    });
  });

  // merged game states: the size of each state group; its members are looked up only when a panel lists them,
  // so start-up (what a large tree costs) makes one pass over the nodes for them
  var group = D.state_group;
  var groupSize = new Int32Array(M.merged_states || 0);
  for (i = 0; i < N; i++) if (group[i] >= 0) groupSize[group[i]]++;
  function othersInState(n) { // nodes other than n that reached n's game state
    return group[n] < 0 ? 0 : groupSize[group[n]] - 1;
  }
  function membersOf(g, limit) { // the first `limit` nodes of state group g, in id order
    var out = [];
    for (var m = 0; m < N && out.length < limit; m++) if (group[m] === g) out.push(m);
    return out;
  }
  function groupColor(g) { // well-spread hues, so that two groups side by side differ
    return "hsl(" + Math.round((g * 137.508) % 360) + ", 60%, 36%)";
  }
  var pairsChosen = {}, pairsRejected = {}, pairsAt = {};
  D.pairs.forEach(function (p, idx) {
    (pairsAt[p[0]] = pairsAt[p[0]] || []).push(idx);
    (pairsChosen[p[1]] = pairsChosen[p[1]] || []).push(idx);
    (pairsRejected[p[2]] = pairsRejected[p[2]] || []).push(idx);
  });

  // ------------------------------------------------------------------------------------------- colour

  var colorKind = M.color;
  var scale = M.scale.map(function (c) {
    return [parseInt(c.slice(1, 3), 16), parseInt(c.slice(3, 5), 16), parseInt(c.slice(5, 7), 16)];
  });
  var palette = [];
  for (i = 0; i <= 100; i++) {
    var v = i / 100, a, b, t;
    if (v <= 0.5) { a = scale[0]; b = scale[1]; t = v * 2; } else { a = scale[1]; b = scale[2]; t = v * 2 - 1; }
    palette.push("rgb(" + [0, 1, 2].map(function (c) { return Math.round(a[c] + (b[c] - a[c]) * t); }).join(",") + ")");
  }
  function colorOf(n) {
    var v = D.values[colorKind][n];
    if (v === null || v === undefined) return M.no_value;
    return palette[Math.round(Math.min(Math.max(v, 0), 1) * 100)];
  }

  // -------------------------------------------------------------------------------------------- state

  var expanded = new Uint8Array(N);
  var pass = new Uint8Array(N).fill(1); // node passes the source filter
  var enabled = models.map(function () { return true; });
  var visible = new Int32Array(N);
  var nVisible = 0;
  var rowOf = new Int32Array(N).fill(-1);
  var selected = 0;
  var matches = new Uint8Array(N);
  var matchList = [];
  var matchPos = -1;
  var lastQuery = null;
  var lowered = new Array(S.length);

  function lower(sid) {
    var s = lowered[sid];
    if (s === undefined) s = lowered[sid] = S[sid].replace(/\s+/g, " ").toLowerCase();
    return s;
  }

  function rebuildVisible() {
    for (var q = 0; q < nVisible; q++) rowOf[visible[q]] = -1;
    nVisible = 0;
    var stack = [0];
    while (stack.length) {
      var n = stack.pop();
      rowOf[n] = nVisible;
      visible[nVisible++] = n;
      if (!expanded[n]) continue;
      for (var c = kidStart[n + 1] - 1; c >= kidStart[n]; c--) {
        var kid = kidIds[c];
        if (pass[kid]) stack.push(kid);
      }
    }
    spacer.style.height = nVisible * ROW + "px";
  }

  function visibleKids(n) {
    var out = 0;
    for (var c = kidStart[n]; c < kidStart[n + 1]; c++) if (pass[kidIds[c]]) out++;
    return out;
  }

  function expandTo(n) { // expand every ancestor of n
    for (n = parent[n]; n >= 0; n = parent[n]) expanded[n] = 1;
  }

  // ------------------------------------------------------------------------------------------- layout

  var root = document.body;
  var header = el("header", "top");
  var titleRow = el("div", "title-row");
  if (M.index_href && /^[A-Za-z0-9._-]+\.html$/.test(M.index_href)) {
    var back = el("a", "back", "\u2190 run index");
    back.href = M.index_href;
    titleRow.appendChild(back);
  }
  append(titleRow, el("h1", null, M.title));
  if (M.title !== M.task_id) append(titleRow, el("span", "task", M.task_id));
  if (M.env_id) append(titleRow, el("span", "env", M.env_id));
  append(header, titleRow);
  if (M.instruction) append(header, el("div", "instruction", M.instruction));
  var sm = M.summary;
  var sumText = sm.nodes + " nodes \u00b7 " + sm.trajectories + " trajectories (" + sm.successes + " won, " +
    sm.failures + " not) \u00b7 mean return " + fmt(sm.mean_return) + " \u00b7 depth " + sm.depth + " \u00b7 " +
    sm.leaves + " leaves \u00b7 " + sm.branch_points + " branch points";
  append(header, el("div", "summary", sumText));
  var search = M.search || {};
  var notes = [];
  notes.push(D.search_visits ? "search: " + (search.algorithm || "MCTS") +
    (search.iterations !== undefined ? ", " + search.iterations + " simulations" : "") +
    (search.gamma !== undefined ? ", gamma " + search.gamma : "") : "search: none (no MCTS values)");
  notes.push("best path: " + M.best_origin);
  if (M.state_keys) {
    notes.push(M.merged_states ? M.merged_nodes + " nodes in " + M.merged_states + " merged game states"
      : "no merged game states");
  }
  notes.push(D.pairs.length + " TreeDPO pairs (" + M.pairs_origin + ")" +
    (M.trajectory_pairs ? "; " + M.trajectory_pairs + " whole-trajectory pairs not drawn" : ""));
  append(header, el("div", "notes", notes.join(" \u00b7 ")));
  if (M.value_note) append(header, el("div", "warn", M.value_note));
  if (M.file) append(header, el("div", "file", M.file));

  // toolbar
  var bar = el("div", "toolbar");
  var colorSel = el("select");
  colorSel.id = "color";
  colorSel.title = "colour of the nodes";
  M.value_kinds.forEach(function (kind) {
    var o = el("option", null, M.value_labels[kind]);
    o.value = kind;
    if (kind === colorKind) o.selected = true;
    colorSel.appendChild(o);
  });
  var colorLabel = append(el("label", "ctl", "colour "), colorSel);

  var q = el("input");
  q.id = "search";
  q.type = "search";
  q.placeholder = "search actions (Enter: next match)";
  q.autocomplete = "off";
  q.spellcheck = false;
  var scope = el("select");
  scope.id = "scope";
  [["action", "in actions"], ["all", "in all text"]].forEach(function (s) {
    var o = el("option", null, s[1]);
    o.value = s[0];
    scope.appendChild(o);
  });
  var prevBtn = el("button", null, "\u2191");
  prevBtn.id = "prev-match";
  prevBtn.title = "previous match (Shift+Enter)";
  var nextBtn = el("button", null, "\u2193");
  nextBtn.id = "next-match";
  nextBtn.title = "next match (Enter)";
  var countEl = el("span", "count", "");
  countEl.id = "match-count";
  var searchBox = append(el("span", "ctl search"), q, scope, prevBtn, nextBtn, countEl);

  function button(id, text, title) {
    var b = el("button", null, text);
    b.id = id;
    b.title = title;
    return b;
  }
  var expandAllBtn = button("expand-all", "expand all", "expand every node");
  var collapseAllBtn = button("collapse-all", "collapse all", "collapse every node below the root");
  var bestBtn = button("show-best", "best path", "expand the best path (all its branches) and select its last node");
  var expandBox = append(el("span", "ctl"), expandAllBtn, collapseAllBtn, bestBtn);

  var srcBox = el("span", "ctl sources");
  srcBox.id = "sources";
  append(srcBox, el("span", "label", "sources"));
  var rootCounts = {};
  sourceCounts(0).forEach(function (sc) { rootCounts[sc[0]] = sc[1]; });
  var srcInputs = models.map(function (m, idx) {
    var box = el("input");
    box.type = "checkbox";
    box.checked = true;
    box.value = String(idx);
    box.dataset.model = m;
    var lab = append(el("label", "src"), box, el("span", null, m + " (" + (rootCounts[idx] || 0) + ")"));
    srcBox.appendChild(lab);
    return box;
  });
  append(bar, colorLabel, searchBox, expandBox, models.length > 1 ? srcBox : null);

  var main = el("main");
  var pane = el("section", "pane");
  var treeEl = el("div", "tree");
  treeEl.id = "tree";
  treeEl.tabIndex = 0;
  treeEl.setAttribute("role", "tree");
  treeEl.setAttribute("aria-label", "trajectory tree");
  var spacer = el("div", "spacer");
  treeEl.appendChild(spacer);
  pane.appendChild(treeEl);
  var panel = el("aside", "panel");
  panel.id = "panel";
  panel.setAttribute("aria-live", "polite");
  append(main, pane, panel);

  // legend
  var legend = el("footer", "legend");
  legend.id = "legend";
  var grad = el("span", "grad");
  grad.style.background = "linear-gradient(to right, " + M.scale.join(", ") + ")";
  var legendLabel = el("span", "legend-kind", "");
  var noVal = el("span", "sw");
  noVal.style.background = M.no_value;
  append(legend,
    append(el("span", "item"), legendLabel, el("span", "tick", "0"), grad, el("span", "tick", "1")),
    append(el("span", "item"), noVal, el("span", null, "no value")),
    append(el("span", "item"), el("span", "mk won", "\u2713"), el("span", null, "won (trajectories ending here)")),
    append(el("span", "item"), el("span", "mk failed", "\u2717"), el("span", null, "failed")),
    append(el("span", "item"), el("span", "mk mixed", "\u25d0"), el("span", null, "both")),
    append(el("span", "item"), el("span", "legend-best", "best"), el("span", null, "best path")),
    append(el("span", "item"), el("span", "jm", "\u21b7"), el("span", null, "best path jumps here from another branch (same state)")),
    append(el("span", "item"), el("span", "sg", "\u2261" + "3"), el("span", null, "same game state as other nodes (3: its state group)")),
    append(el("span", "item"), el("span", "badge chosen", "\u25b2"), el("span", null, "chosen (TreeDPO)")),
    append(el("span", "item"), el("span", "badge rejected", "\u25bc"), el("span", null, "rejected")),
    append(el("span", "item"), el("span", "badge div", "\u25c6"), el("span", null, "pairs taken here")),
    append(el("span", "item"), el("span", "keys", "\u2191\u2193 move \u00b7 \u2192 expand/child \u00b7 \u2190 collapse/parent \u00b7 Enter toggle \u00b7 / search"))
  );
  function updateLegend() { legendLabel.textContent = M.value_labels[colorKind] + ":"; }

  append(root, header, bar, main, legend);

  // -------------------------------------------------------------------------------------------- rows

  var pool = [];
  function makeRow() {
    var r = el("div", "row");
    r.setAttribute("role", "treeitem");
    var ind = el("span", "ind");
    var tog = el("span", "tog");
    var sw = el("span", "sw");
    var mk = el("span", "mk");
    var jm = el("span", "jm");
    var act = el("span", "act");
    var bd = el("span", "bd");
    var bc = el("span", "badge chosen"), br = el("span", "badge rejected"), bv = el("span", "badge div");
    append(bd, bc, br, bv);
    var sg = el("span", "sg");
    var st = el("span", "st");
    append(r, ind, tog, sw, mk, jm, act, bd, sg, st);
    r._p = { ind: ind, tog: tog, sw: sw, mk: mk, jm: jm, act: act, bc: bc, br: br, bv: bv, sg: sg, st: st, node: -1 };
    treeEl.appendChild(r);
    return r;
  }
  var MARKS = ["", "\u2713", "\u2717", "\u25d0"];
  var MARK_CLASS = ["mk", "mk won", "mk failed", "mk mixed"];

  function fillRow(r, n, idx) {
    var p = r._p;
    p.node = n;
    r.dataset.node = String(n);
    r.style.top = idx * ROW + "px";
    var cls = "row";
    if (best[n]) cls += " best";
    if (jumpFrom[n] >= 0) cls += " jump";
    if (group[n] >= 0) cls += " merged";
    if (n === selected) cls += " sel";
    if (matches[n]) cls += " match";
    if (pairsChosen[n]) cls += " chosen";
    if (pairsRejected[n]) cls += " rejected";
    if (outcome[n]) cls += " end-" + ["", "won", "failed", "mixed"][outcome[n]];
    r.className = cls;
    r.setAttribute("aria-selected", n === selected ? "true" : "false");
    p.ind.style.width = depth[n] * 14 + "px";
    var kids = nkids[n] ? visibleKids(n) : 0;
    p.tog.textContent = kids ? (expanded[n] ? "\u25be" : "\u25b8") : "";
    if (kids) r.setAttribute("aria-expanded", expanded[n] ? "true" : "false");
    else r.removeAttribute("aria-expanded");
    p.sw.style.background = colorOf(n);
    p.mk.textContent = MARKS[outcome[n]];
    p.mk.className = MARK_CLASS[outcome[n]];
    p.act.textContent = n === 0 ? "\u25a3 " + M.task_id : oneLine(S[D.action[n]], 400);
    p.bc.textContent = pairsChosen[n] ? "\u25b2" : "";
    p.br.textContent = pairsRejected[n] ? "\u25bc" : "";
    p.bv.textContent = pairsAt[n] ? "\u25c6" : "";
    p.jm.textContent = jumpFrom[n] >= 0 ? "\u21b7" : "";
    p.jm.title = jumpFrom[n] >= 0 ? "the best path jumps here: reached from node " + jumpFrom[n] + "'s state" : "";
    var g = group[n];
    p.sg.textContent = g >= 0 ? "\u2261" + g : "";
    p.sg.style.color = g >= 0 ? groupColor(g) : "";
    p.sg.title = g >= 0 ? "same state as " + othersInState(n) + " other node" + (othersInState(n) === 1 ? "" : "s") +
      " (state group " + g + ")" : "";
    var v = D.values[colorKind][n];
    p.st.textContent = "n=" + D.visits[n] + (v === null ? "" : " v=" + fmt(v, 2)) +
      (nkids[n] && !expanded[n] ? " \u00b7 " + nkids[n] + (nkids[n] === 1 ? " child" : " children") : "");
  }

  var scheduled = false;
  function renderRows() {
    scheduled = false;
    var top = treeEl.scrollTop;
    var h = treeEl.clientHeight || 600;
    var first = Math.max(0, Math.floor(top / ROW) - OVERSCAN);
    var last = Math.min(nVisible, Math.ceil((top + h) / ROW) + OVERSCAN);
    var need = last - first;
    while (pool.length < need) pool.push(makeRow());
    for (var q2 = 0; q2 < pool.length; q2++) {
      var r = pool[q2];
      if (q2 < need) {
        fillRow(r, visible[first + q2], first + q2);
        if (r.hidden) r.hidden = false;
      } else if (!r.hidden) {
        r.hidden = true;
        r._p.node = -1;
        delete r.dataset.node;
      }
    }
  }
  function scheduleRender() {
    if (!scheduled) {
      scheduled = true;
      requestAnimationFrame(renderRows);
    }
  }

  function refresh() {
    rebuildVisible();
    renderRows();
  }

  function scrollToRow(n) {
    var idx = rowOf[n];
    if (idx < 0) return;
    var top = idx * ROW, h = treeEl.clientHeight || 600;
    if (top < treeEl.scrollTop) treeEl.scrollTop = top;
    else if (top + ROW > treeEl.scrollTop + h) treeEl.scrollTop = top + ROW - h;
  }

  // ------------------------------------------------------------------------------------------- panel

  function section(title, body, cls) {
    var s = el("section", "sec" + (cls ? " " + cls : ""));
    append(s, el("h3", null, title), body);
    return s;
  }
  function pre(text, empty) {
    if (!text) return el("p", "empty", empty || "(none)");
    return el("pre", "text", text);
  }
  function table(rows, cls) {
    var t = el("table", cls || "kv");
    rows.forEach(function (r) {
      var tr = el("tr");
      append(tr, el("th", null, r[0]), el("td", null, r[1]));
      t.appendChild(tr);
    });
    return t;
  }
  function nodeLink(n, text) {
    var b = el("button", "link", text);
    b.dataset.goto = String(n);
    return b;
  }
  function actionLabel(n) { return n === 0 ? "(task)" : oneLine(S[D.action[n]], 60); }

  var SAME_STATE_LINKS = 20; // the most "same state" links a panel lists (a state can have thousands of nodes)
  function sameStateSection(n, others) {
    var g = group[n];
    var ul = el("ul", "same-state");
    var shown = 0;
    membersOf(g, SAME_STATE_LINKS + 1).forEach(function (m) {
      if (m === n || shown === SAME_STATE_LINKS) return;
      var li = el("li");
      append(li, nodeLink(m, "node " + m + ": " + actionLabel(m)),
        el("span", "muted", " depth " + depth[m] + ", n=" + D.visits[m] + (best[m] ? ", on the best path" : "")));
      ul.appendChild(li);
      shown++;
    });
    if (others > shown) ul.appendChild(el("li", "muted", "+" + (others - shown) + " more"));
    return section("Same state as " + others + " other node" + (others === 1 ? "" : "s") + " (state group " + g + ")",
      ul, "same-state");
  }

  function showPanel(n) {
    panel.replaceChildren();
    panel.dataset.node = String(n);
    var head = el("div", "phead");
    append(head, el("h2", null, n === 0 ? "Task (root)" : "Node " + n), el("span", "depth", "depth " + depth[n]));
    panel.appendChild(head);
    // path from the root
    var chain = [];
    for (var m = n; m >= 0; m = parent[m]) chain.push(m);
    chain.reverse();
    var crumbs = el("div", "crumbs");
    chain.forEach(function (m2, idx) {
      if (idx) crumbs.appendChild(el("span", "sep", "\u203a"));
      crumbs.appendChild(m2 === n ? el("span", "here", actionLabel(m2)) : nodeLink(m2, actionLabel(m2)));
    });
    panel.appendChild(crumbs);
    var flags = el("div", "flags");
    if (best[n]) flags.appendChild(el("span", "flag best", "on the best path"));
    if (jumpFrom[n] >= 0) {
      flags.appendChild(append(el("span", "flag jump", "\u21b7 best path jumps here: reached from "),
        nodeLink(jumpFrom[n], "node " + jumpFrom[n]), el("span", null, "'s state")));
    }
    var others = othersInState(n);
    if (others) {
      flags.appendChild(el("span", "flag merged", "\u2261" + group[n] + " same state as " + others + " other node" +
        (others === 1 ? "" : "s")));
    }
    if (outcome[n]) flags.appendChild(el("span", "flag end-" + ["", "won", "failed", "mixed"][outcome[n]],
      ["", "trajectories ended here: won", "trajectories ended here: failed", "trajectories ended here: won and failed"][outcome[n]]));
    if (pairsChosen[n]) flags.appendChild(el("span", "flag chosen", "chosen in " + pairsChosen[n].length + " pair(s)"));
    if (pairsRejected[n]) flags.appendChild(el("span", "flag rejected", "rejected in " + pairsRejected[n].length + " pair(s)"));
    if (flags.childNodes.length) panel.appendChild(flags);

    if (n === 0) {
      panel.appendChild(section("Instruction", pre(M.instruction)));
      panel.appendChild(section("First observation", pre(S[D.obs[0]])));
    } else {
      panel.appendChild(section("Action", pre(S[D.action[n]]), "action"));
      panel.appendChild(section("Thought", pre(S[D.thought[n]]), "thought"));
      panel.appendChild(section("Observation after the action", pre(S[D.obs[n]]), "observation"));
      var det = el("details", "before");
      append(det, el("summary", null, "Observation the action was chosen on"), pre(S[D.obs_before[n]]));
      panel.appendChild(det);
    }

    var vis = D.visits[n], suc = D.successes[n];
    var rows = [
      ["visits (trajectories)", String(vis)],
      ["successes / failures", suc + " / " + (vis - suc)],
      ["success rate", vis ? fmt(suc / vis) : "\u2013"],
      ["return sum", fmt(D.return_sum[n], 4)],
      ["mean return", vis ? fmt(D.return_sum[n] / vis) : "\u2013"],
      ["children", String(nkids[n])]
    ];
    var term = D.terminal[String(n)];
    if (term) rows.push(["ended here", Object.keys(term).map(function (kk) { return kk + " " + term[kk]; }).join(", ")]);
    panel.appendChild(section("Data statistics", table(rows)));

    var srows = sourceCounts(n).map(function (sc) { return [models[sc[0]], String(sc[1])]; });
    panel.appendChild(section("Sources (trajectories per model)", srows.length ? table(srows) : el("p", "empty", "(none)"), "sources"));

    var mrows = [];
    if (D.search_visits) {
      var mv = D.search_visits[n], ms = D.search_value_sum[n];
      mrows.push(["search visits N (c_M)", String(mv)], ["value sum W (r_M)", fmt(ms, 4)], ["search value Q = W/N", mv ? fmt(ms / mv) : "\u2013"]);
    } else {
      mrows.push(["MCTS", "not searched"]);
    }
    M.value_kinds.forEach(function (kind) {
      mrows.push([M.value_labels[kind] + (kind === M.value ? " (best path, pairs)" : ""), fmt(D.values[kind][n])]);
    });
    panel.appendChild(section("Search statistics and values", table(mrows)));

    if (others) panel.appendChild(sameStateSection(n, others));

    var prs = [];
    (pairsAt[n] || []).forEach(function (pi) {
      var p = D.pairs[pi];
      var li = el("li");
      append(li, el("span", "badge chosen", "\u25b2"), nodeLink(p[1], actionLabel(p[1])), el("span", null, " over "),
        el("span", "badge rejected", "\u25bc"), nodeLink(p[2], actionLabel(p[2])),
        el("span", "muted", " gap " + fmt(p[3], 2) + ", " + p[4]));
      prs.push(li);
    });
    (pairsChosen[n] || []).forEach(function (pi) {
      var p = D.pairs[pi];
      var li = el("li");
      append(li, el("span", "badge chosen", "\u25b2"), el("span", null, "chosen over "), nodeLink(p[2], actionLabel(p[2])),
        el("span", "muted", " gap " + fmt(p[3], 2) + ", " + p[4]));
      prs.push(li);
    });
    (pairsRejected[n] || []).forEach(function (pi) {
      var p = D.pairs[pi];
      var li = el("li");
      append(li, el("span", "badge rejected", "\u25bc"), el("span", null, "rejected for "), nodeLink(p[1], actionLabel(p[1])),
        el("span", "muted", " gap " + fmt(p[3], 2) + ", " + p[4]));
      prs.push(li);
    });
    if (prs.length) {
      var ul = el("ul", "pairs");
      prs.forEach(function (li) { ul.appendChild(li); });
      panel.appendChild(section("TreeDPO pairs", ul, "pairs"));
    }

    if (nkids[n]) {
      var kids = [];
      for (var c = kidStart[n]; c < kidStart[n + 1]; c++) kids.push(kidIds[c]);
      var vals = D.values[M.value];
      kids.sort(function (x, y) {
        var vx = vals[x] === null ? -1 : vals[x], vy = vals[y] === null ? -1 : vals[y];
        return vy - vx || x - y;
      });
      var cl = el("ol", "kids");
      kids.slice(0, 50).forEach(function (kid) {
        var li = el("li");
        append(li, nodeLink(kid, actionLabel(kid)),
          el("span", "muted", " n=" + D.visits[kid] + " " + M.value + "=" + fmt(vals[kid], 2)));
        cl.appendChild(li);
      });
      if (kids.length > 50) cl.appendChild(el("li", "muted", "+" + (kids.length - 50) + " more"));
      panel.appendChild(section("Children by " + M.value_labels[M.value], cl, "children"));
    }
  }

  // ---------------------------------------------------------------------------------------- actions

  function select(n, opts) {
    opts = opts || {};
    if (n < 0 || n >= N) return;
    if (!pass[n]) return;
    if (rowOf[n] < 0) {
      expandTo(n);
      rebuildVisible();
    }
    selected = n;
    scrollToRow(n);
    renderRows();
    showPanel(n);
    if (opts.hash !== false) {
      try { history.replaceState(null, "", "#node=" + n); } catch (e) { /* file: URLs may refuse */ }
    }
  }

  function toggle(n) {
    if (!nkids[n]) return;
    expanded[n] = expanded[n] ? 0 : 1;
    refresh();
  }

  function setExpandedAll(on) {
    expanded.fill(on ? 1 : 0);
    expanded[0] = 1;
    if (!on && selected !== 0 && parent[selected] !== 0) selected = 0;
    refresh();
    if (!on) showPanel(selected);
  }

  function revealBestPaths() { // every ancestor of every best-path node: a path that jumps is shown whole
    D.best_paths.forEach(function (p) { p.forEach(expandTo); });
  }

  function showBest() {
    if (!D.best_paths.length) return;
    var p = D.best_paths[0];
    revealBestPaths();
    refresh();
    select(p[p.length - 1]);
  }

  function applyFilter() {
    enabled = srcInputs.map(function (b) { return b.checked; });
    pass[0] = 1;
    for (var n = 1; n < N; n++) {
      var s = D.src[n], ok = false;
      if (typeof s === "number") ok = enabled[s];
      else for (var q4 = 0; q4 < s.length && !ok; q4 += 2) ok = enabled[s[q4]] && s[q4 + 1] > 0;
      pass[n] = ok ? 1 : 0;
    }
    if (!pass[selected]) {
      var m = selected;
      while (!pass[m]) m = parent[m];
      selected = m;
      showPanel(m);
    }
    if (lastQuery) runSearch(lastQuery, false);
    refresh();
  }

  function runSearch(query, jump) {
    lastQuery = query;
    matches.fill(0);
    matchList = [];
    matchPos = -1;
    var needle = query.replace(/\s+/g, " ").trim().toLowerCase();
    if (!needle) {
      lastQuery = null;
      countEl.textContent = "";
      refresh();
      return;
    }
    var all = scope.value === "all";
    for (var n = 1; n < N; n++) {
      if (!pass[n]) continue;
      var hit = lower(D.action[n]).indexOf(needle) >= 0;
      if (!hit && all) {
        hit = lower(D.thought[n]).indexOf(needle) >= 0 || lower(D.obs[n]).indexOf(needle) >= 0;
      }
      if (hit) {
        matches[n] = 1;
        matchList.push(n);
        expandTo(n);
      }
    }
    refresh();
    if (jump !== false && matchList.length) gotoMatch(0);
    else updateCount();
  }
  function updateCount() {
    countEl.textContent = matchList.length ? (matchPos + 1) + " / " + matchList.length : "no match";
  }
  function gotoMatch(pos) {
    if (!matchList.length) return updateCount();
    matchPos = ((pos % matchList.length) + matchList.length) % matchList.length;
    select(matchList[matchPos]);
    updateCount();
  }

  // ----------------------------------------------------------------------------------------- events

  treeEl.addEventListener("scroll", scheduleRender, { passive: true });
  window.addEventListener("resize", scheduleRender);
  treeEl.addEventListener("click", function (ev) {
    var r = ev.target.closest(".row");
    if (!r || r._p.node < 0) return;
    var n = r._p.node;
    if (ev.target === r._p.tog) toggle(n);
    select(n);
    treeEl.focus({ preventScroll: true });
  });
  treeEl.addEventListener("dblclick", function (ev) {
    var r = ev.target.closest(".row");
    if (r && r._p.node >= 0 && ev.target !== r._p.tog) toggle(r._p.node);
  });
  panel.addEventListener("click", function (ev) {
    var b = ev.target.closest("[data-goto]");
    if (b) select(+b.dataset.goto);
  });
  treeEl.addEventListener("keydown", function (ev) {
    var idx = rowOf[selected];
    var page = Math.max(1, Math.floor((treeEl.clientHeight || 600) / ROW) - 1);
    var n = selected;
    switch (ev.key) {
      case "ArrowDown": if (idx + 1 < nVisible) select(visible[idx + 1]); break;
      case "ArrowUp": if (idx > 0) select(visible[idx - 1]); break;
      case "PageDown": select(visible[Math.min(nVisible - 1, idx + page)]); break;
      case "PageUp": select(visible[Math.max(0, idx - page)]); break;
      case "Home": select(visible[0]); break;
      case "End": select(visible[nVisible - 1]); break;
      case "ArrowRight":
        if (nkids[n] && visibleKids(n)) {
          if (!expanded[n]) toggle(n);
          else select(visible[idx + 1]);
        }
        break;
      case "ArrowLeft":
        if (nkids[n] && expanded[n] && n !== 0) toggle(n);
        else if (parent[n] >= 0) select(parent[n]);
        break;
      case "Enter":
      case " ":
        toggle(n);
        renderRows();
        break;
      default:
        return;
    }
    ev.preventDefault();
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "/" && document.activeElement !== q) {
      ev.preventDefault();
      q.focus();
      q.select();
    }
  });
  q.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter") {
      ev.preventDefault();
      if (q.value !== lastQuery) runSearch(q.value);
      else gotoMatch(matchPos + (ev.shiftKey ? -1 : 1));
    } else if (ev.key === "Escape") {
      q.value = "";
      runSearch("");
      treeEl.focus();
    }
  });
  q.addEventListener("search", function () { if (!q.value) runSearch(""); });
  scope.addEventListener("change", function () { if (lastQuery) runSearch(lastQuery); });
  prevBtn.addEventListener("click", function () {
    if (q.value !== lastQuery) runSearch(q.value); else gotoMatch(matchPos - 1);
  });
  nextBtn.addEventListener("click", function () {
    if (q.value !== lastQuery) runSearch(q.value); else gotoMatch(matchPos + 1);
  });
  colorSel.addEventListener("change", function () {
    colorKind = colorSel.value;
    updateLegend();
    renderRows();
  });
  expandAllBtn.addEventListener("click", function () { setExpandedAll(true); });
  collapseAllBtn.addEventListener("click", function () { setExpandedAll(false); });
  bestBtn.addEventListener("click", showBest);
  srcInputs.forEach(function (b) { b.addEventListener("change", applyFilter); });
  window.addEventListener("hashchange", function () {
    var m = /node=(\d+)/.exec(location.hash);
    if (m && +m[1] !== selected) select(+m[1], { hash: false });
  });

  // ------------------------------------------------------------------------------------------ start

  for (i = 0; i < N; i++) if (depth[i] < M.expand_depth) expanded[i] = 1;
  expanded[0] = 1;
  revealBestPaths();
  updateLegend();
  rebuildVisible();
  var start = /node=(\d+)/.exec(location.hash);
  if (start && +start[1] < N) select(+start[1], { hash: false });
  else { renderRows(); showPanel(0); }

  var now = performance.now();
  window.__w2s = { ready: true, nodes: N, firstRenderMs: now - t0, readyAt: now };
  document.body.dataset.ready = "1";
})();
