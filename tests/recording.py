"""A backend for tests that passes everything through to a real one and keeps the evaluate requests."""

from __future__ import annotations


class RecordingBackend:
    """The real backend underneath, with every evaluate request that reached it in `requests`."""

    def __init__(self, backend):
        self.backend, self.requests = backend, []

    def model_info(self, model):
        return self.backend.model_info(model)

    def stats(self, request):
        return self.backend.stats(request)

    def evaluate(self, request):
        self.requests.append(request)
        return self.backend.evaluate(request)

    def close(self):
        pass
