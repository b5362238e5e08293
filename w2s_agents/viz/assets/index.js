/* w2s-agents run index: a sortable, filterable table of the trees of a run, linking to each tree's viewer
 * page. Reads the JSON data embedded in the page; every text is set with textContent. */
(function () {
  "use strict";

  var D = JSON.parse(document.getElementById("w2s-data").textContent);
  var trees = D.trees;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || v !== v) return "\u2013";
    return Number(v).toFixed(digits === undefined ? 3 : digits);
  }
  function sum(key) {
    return trees.reduce(function (acc, t) { return acc + (t.summary ? t.summary[key] : 0); }, 0);
  }

  var ok = trees.filter(function (t) { return !t.error; });
  var bad = trees.length - ok.length;
  var wrap = el("div", "wrap");
  wrap.appendChild(el("h1", null, D.meta.title));
  var traj = sum("trajectories"), won = sum("successes");
  wrap.appendChild(el("div", "totals", ok.length + " trees \u00b7 " + sum("nodes") + " nodes \u00b7 " + traj +
    " trajectories, " + won + " won (" + (traj ? fmt(won / traj, 3) : "\u2013") + ")" +
    (bad ? " \u00b7 " + bad + " tree file(s) could not be read" : "") + " \u00b7 run folder " + D.meta.run_dir));
  var filter = el("input");
  filter.id = "filter";
  filter.type = "search";
  filter.placeholder = "filter by task or file";
  wrap.appendChild(filter);

  // [header, key(t) for sorting, cell(t) builder, css class]
  var columns = [
    ["task", function (t) { return t.summary ? t.summary.task_id : ""; }, function (t, td) {
      if (t.page && /^[A-Za-z0-9._-]+\.html$/.test(t.page)) {
        var a = el("a", null, t.summary.task_id);
        a.href = t.page;
        td.appendChild(a);
      } else {
        td.textContent = t.summary ? t.summary.task_id : "(unreadable)";
      }
    }, "text"],
    ["file", function (t) { return t.file; }, null, "text"],
    ["nodes", function (t) { return t.summary ? t.summary.nodes : -1; }],
    ["depth", function (t) { return t.summary ? t.summary.depth : -1; }],
    ["branch points", function (t) { return t.summary ? t.summary.branch_points : -1; }],
    ["trajectories", function (t) { return t.summary ? t.summary.trajectories : -1; }],
    ["success", function (t) { return t.summary && t.summary.trajectories ? t.summary.successes / t.summary.trajectories : -1; },
      function (t, td) {
        if (!t.summary) return;
        var r = t.summary.trajectories ? t.summary.successes / t.summary.trajectories : 0;
        var bar = el("span", "bar");
        var fillEl = el("span");
        fillEl.style.width = Math.round(r * 100) + "%";
        bar.appendChild(fillEl);
        td.appendChild(bar);
        td.appendChild(document.createTextNode(t.summary.successes + "/" + t.summary.trajectories));
      }],
    ["mean return", function (t) { return t.summary ? t.summary.mean_return : -1; }, function (t, td) {
      td.textContent = t.summary ? fmt(t.summary.mean_return) : "";
    }],
    ["best path steps", function (t) { return t.error ? -1 : t.best_steps; }, function (t, td) {
      td.textContent = t.error ? "" : t.best_steps;
    }],
    ["best path return", function (t) { return t.best_return === null ? -1 : t.best_return; }, function (t, td) {
      td.textContent = t.error ? "" : fmt(t.best_return);
    }],
    ["value", function (t) { return t.value; }, null, "text"],
    ["pairs", function (t) { return t.error ? -1 : t.pairs; }, function (t, td) {
      td.textContent = t.error ? "" : t.pairs;
    }],
    ["MCTS simulations", function (t) { return t.iterations === null || t.iterations === undefined ? -1 : t.iterations; },
      function (t, td) {
        td.textContent = t.error ? "" : t.searched ? (t.iterations === null ? "yes" : t.iterations) : "not searched";
      }],
    ["sources", function (t) { return t.summary ? Object.keys(t.summary.sources).join(",") : ""; }, function (t, td) {
      if (!t.summary) return;
      var src = t.summary.sources;
      td.textContent = Object.keys(src).map(function (m) { return m + " " + src[m]; }).join(", ");
    }, "text"]
  ];

  var table = el("table", "runs");
  table.id = "trees";
  var thead = el("thead");
  var hr = el("tr");
  var ths = columns.map(function (c, idx) {
    var th = el("th", c[3] || null, c[0]);
    th.dataset.col = String(idx);
    hr.appendChild(th);
    return th;
  });
  thead.appendChild(hr);
  var tbody = el("tbody");
  table.appendChild(thead);
  table.appendChild(tbody);
  wrap.appendChild(table);
  document.body.appendChild(wrap);

  var sortCol = 1, sortDir = 1; // by file
  function render() {
    var needle = filter.value.trim().toLowerCase();
    var rows = trees.filter(function (t) {
      if (!needle) return true;
      var name = (t.summary ? t.summary.task_id : "") + " " + t.file;
      return name.toLowerCase().indexOf(needle) >= 0;
    });
    var key = columns[sortCol][1];
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * sortDir || (a.file < b.file ? -1 : 1);
    });
    tbody.replaceChildren();
    rows.forEach(function (t) {
      var tr = el("tr", t.error ? "error" : null);
      tr.dataset.file = t.file;
      if (t.error) {
        var a = el("td", "text"); columns[0][2](t, a); tr.appendChild(a);
        tr.appendChild(el("td", "text", t.file));
        var err = el("td", "err", t.error);
        err.colSpan = columns.length - 2;
        tr.appendChild(err);
      } else {
        columns.forEach(function (c) {
          var td = el("td", c[3] || null);
          if (c[2]) c[2](t, td); else td.textContent = c[1](t);
          tr.appendChild(td);
        });
      }
      tbody.appendChild(tr);
    });
    ths.forEach(function (th, idx) {
      th.className = (columns[idx][3] || "") + (idx === sortCol ? (sortDir > 0 ? " sorted-asc" : " sorted-desc") : "");
    });
  }
  thead.addEventListener("click", function (ev) {
    var th = ev.target.closest("th");
    if (!th) return;
    var col = +th.dataset.col;
    if (col === sortCol) sortDir = -sortDir; else { sortCol = col; sortDir = 1; }
    render();
  });
  filter.addEventListener("input", render);
  render();
  window.__w2s = { ready: true, trees: trees.length };
  document.body.dataset.ready = "1";
})();
