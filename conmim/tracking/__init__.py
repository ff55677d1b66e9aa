"""MLflow: the client and the sweep's runs (:mod:`.client`), the tag names (:mod:`.tags`),
redaction of credentials (:mod:`.redact`), the outage buffer (:mod:`.buffer`) and the Ray Train
callback that logs each epoch (:mod:`.callback`, imports Ray)."""
