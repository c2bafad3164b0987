/* Job and run pages: line charts of metrics over steps, and the job page's live log and loss
 * chart.
 *
 * Served from /static (the Content-Security-Policy allows no inline scripts), after Chart.js
 * (all scripts are deferred, in order). A canvas[data-series] holds its chart as JSON:
 * {datasets: [{label, points: [[step, value], ...], color}], x_title, y_title, legend}. The
 * job page's [data-job-live] section polls its data-log-url (as JSON) for the log text after
 * its cursor, the job's state and the loss chart, until the job has finished. Without this
 * script the pages still show the log and every value; the status panel refreshes by htmx.
 */
(function () {
  "use strict";
  if (window.flywheelJobs) return;
  window.flywheelJobs = true;

  var PALETTE = ["#4f46e5", "#0ea5e9", "#f59e0b", "#10b981", "#ec4899", "#8b5cf6", "#14b8a6", "#f97316"];
  var POLL_MS = 1000;
  var RETRY_MS = 3000;

  function cssVar(name, fallback) {
    var value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  function seriesColor(index) {
    var themed = ["--chart-1", "--chart-2", "--chart-3"];
    if (index < themed.length) return cssVar(themed[index], PALETTE[index]);
    return PALETTE[index % PALETTE.length];
  }

  function formatValue(value) {
    if (value === null || value === undefined) return "—";
    var size = Math.abs(value);
    if (size !== 0 && (size < 0.001 || size >= 100000)) return value.toExponential(2);
    return Number(value.toPrecision(4)).toString();
  }

  function datasetsFrom(spec) {
    return (spec.datasets || []).map(function (d, i) {
      var color = seriesColor(typeof d.color === "number" ? d.color : i);
      var points = d.points || [];
      return {
        label: d.label,
        data: points.map(function (p) { return { x: p[0], y: p[1] }; }),
        borderColor: color,
        backgroundColor: color,
        borderWidth: 2,
        // A lone point draws no line: show it as a dot.
        pointRadius: points.length > 1 ? 0 : 3,
        pointHoverRadius: 4,
        tension: 0.2,
        spanGaps: true,
      };
    });
  }

  function seriesConfig(spec) {
    var text = cssVar("--text-3", "#6b7280");
    return {
      type: "line",
      data: { datasets: datasetsFrom(spec) },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        plugins: {
          legend: { display: !!spec.legend },
          tooltip: {
            callbacks: {
              title: function (items) { return items.length ? "step " + items[0].parsed.x : ""; },
              label: function (item) { return " " + item.dataset.label + ": " + formatValue(item.parsed.y); },
            },
          },
        },
        scales: {
          x: {
            type: "linear",
            title: { display: !!spec.x_title, text: spec.x_title || "", color: text },
            grid: { display: false },
            ticks: { precision: 0, maxTicksLimit: 8, color: text },
          },
          y: {
            title: { display: !!spec.y_title, text: spec.y_title || "", color: text },
            grid: { color: cssVar("--chart-grid", "#eceef2") },
            border: { display: false },
            ticks: { maxTicksLimit: 6, color: text, callback: function (value) { return formatValue(value); } },
          },
        },
      },
    };
  }

  function initSeries(root) {
    if (!window.Chart || !root.querySelectorAll) return;
    root.querySelectorAll("canvas[data-series]").forEach(function (canvas) {
      if (window.Chart.getChart(canvas)) return;
      var spec;
      try {
        spec = JSON.parse(canvas.getAttribute("data-series"));
      } catch (e) {
        return;
      }
      if (spec && spec.datasets) new window.Chart(canvas, seriesConfig(spec));
    });
  }

  // -- the job page: follow the log and the loss while the job runs --------------------------

  function showRun(run) {
    var holder = document.getElementById("job-chart-run");
    if (!run || !holder || holder.tagName === "A") return;
    var link = document.createElement("a");
    link.id = "job-chart-run";
    link.className = "small";
    link.href = run.url;
    link.textContent = run.name || run.id;
    holder.replaceWith(link);
  }

  function updateChart(panel, chart) {
    var canvas = panel.querySelector("canvas#job-chart");
    if (!chart || !canvas) return;
    var hasPoints = (chart.datasets || []).some(function (d) { return d.points && d.points.length; });
    var empty = document.getElementById("job-chart-empty");
    if (empty) empty.hidden = hasPoints;
    showRun(chart.run);
    var drawn = window.Chart ? window.Chart.getChart(canvas) : null;
    if (!drawn) return;
    drawn.data.datasets = datasetsFrom(chart);
    drawn.options.plugins.legend.display = true;
    drawn.update("none");
  }

  // A reason to stop following (not a passing network failure).
  function stop(message) {
    var error = new Error(message);
    error.fatal = true;
    return error;
  }

  function follow(panel) {
    var url = panel.getAttribute("data-log-url");
    var log = panel.querySelector("#job-log");
    var state = document.getElementById("job-log-state");
    if (!url || !log) return;

    function say(text) {
      if (state) state.textContent = text;
    }

    function append(text) {
      if (!text) return;
      var atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      log.appendChild(document.createTextNode(text));
      if (atBottom) log.scrollTop = log.scrollHeight;
    }

    function poll() {
      var after = panel.getAttribute("data-after") || "0";
      fetch(url + "?after=" + encodeURIComponent(after), {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        cache: "no-store",
      })
        .then(function (response) {
          if (response.status === 401 || response.redirected) {
            throw stop("Your session ended: reload the page and log in again.");
          }
          if (response.status === 403 || response.status === 404) {
            throw stop("This job can no longer be read (HTTP " + response.status + ").");
          }
          if (!response.ok) return null;
          return response.json();
        })
        .then(function (data) {
          if (!data) {
            window.setTimeout(poll, RETRY_MS);
            return;
          }
          append(data.text);
          panel.setAttribute("data-after", String(data.next));
          updateChart(panel, data.chart);
          // A long log arrives in pages: keep reading until an empty page after the end.
          if (data.finished && !data.text) {
            panel.setAttribute("data-finished", "yes");
            say("complete");
            return;
          }
          window.setTimeout(poll, data.text ? 0 : POLL_MS);
        })
        .catch(function (error) {
          if (error && error.fatal) {
            say(error.message);
            return;
          }
          // The server may be restarting: try again a little later.
          window.setTimeout(poll, RETRY_MS);
        });
    }

    say("following");
    window.setTimeout(poll, POLL_MS);
  }

  function enhance(root) {
    initSeries(root);
  }

  function start() {
    enhance(document.body);
    document.querySelectorAll("[data-job-live]").forEach(function (panel) {
      // The end of a log is what one reads first.
      var log = panel.querySelector("#job-log");
      if (log) log.scrollTop = log.scrollHeight;
      if (panel.getAttribute("data-finished") !== "yes") follow(panel);
    });
  }

  document.addEventListener("htmx:load", function (event) {
    enhance(event.target);
  });

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
