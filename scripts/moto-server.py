"""moto's server, with DynamoDB's conditional writes made atomic as in the real service.

moto serves each request on its own thread and checks a ConditionExpression, then writes,
without a lock: two racing writers that expect the same version can both win, which the real
DynamoDB never allows (pgshift's leases and checkpoints rely on that). This launcher runs the
same server with one change: DynamoDB requests (X-Amz-Target "DynamoDB_…") are served one at
a time. Every other service stays concurrent.
"""

import threading

import moto.server

_Dispatcher = moto.server.DomainDispatcherApplication
_dynamodb = threading.Lock()


class SerialDynamoDB(_Dispatcher):
    def __call__(self, environ, start_response):
        if environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB_"):
            with _dynamodb:
                # moto's responses are buffered: materialise the body under the lock.
                return list(super().__call__(environ, start_response))
        return super().__call__(environ, start_response)


moto.server.DomainDispatcherApplication = SerialDynamoDB

if __name__ == "__main__":
    moto.server.main()
