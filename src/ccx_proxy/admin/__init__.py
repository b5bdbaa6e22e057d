"""The admin API (``/api/messages/...``) and the web console (``/admin``)."""
