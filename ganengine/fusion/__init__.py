"""The machinery behind ``ganengine.fuse`` (ganengine/fuse.py): the rule table (rules.py), the
walk (engine.py), recognition and rewrite-time checks (recognise.py, verify.py, checks.py),
fused forwards for users' own classes (mixins.py, copying.py), forwards written as calls
(graph.py) and the report (report.py). Read docs/fuse.md first."""
