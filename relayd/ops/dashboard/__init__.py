"""The Grafana dashboard of relayd (etc/grafana/relayd.json), written as code.

Why code and not hand-edited JSON: a dashboard export is thousands of lines
where one row is a hundred lines of boilerplate and every panel needs a
unique id and a grid position.  Here `panels.py` owns that boilerplate and
the layout, `rows.py` holds one small function per row (what to graph, as
PromQL), and `build.py` assembles them and writes the file.  A feature adds
its row as one function in `rows.py` and one entry in `ROWS`; then
``python -m relayd.ops.dashboard.build etc/grafana/relayd.json``.
tests/test_opskit_dashboard.py fails when the committed JSON and the
generated one differ, and checks the structure Grafana needs to import it.
"""
