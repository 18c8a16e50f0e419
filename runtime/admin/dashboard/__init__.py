"""The study dashboard: a local web page (127.0.0.1, per-start token) whose backend talks to the server only
through the admin's own mutual-TLS AdminClient. See docs/dashboard.md."""
