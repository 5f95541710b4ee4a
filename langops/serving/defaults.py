"""Default limits and tuning of the model server, in one place.

``ServerSettings`` (what the server runs with) and ``DeployConfig`` (what the pipeline's deploy step
starts it with, from ``params.yaml``) both take their defaults from here. This module imports nothing,
so the config can use it without loading the web stack.
"""

MAX_BATCH_SIZE = 64  # texts per onnxruntime call; 64 is also the pyfunc's scoring chunk (parity with MLflow)
MAX_WAIT_MS = 2.0  # how long the first text of a batch waits for others to join it
MAX_QUEUE = 1024  # texts waiting for inference before requests are shed with 503
MAX_REQUEST_TEXTS = 256  # texts in one request
MAX_TEXT_CHARS = 5000  # characters in one text
MAX_BODY_BYTES = 1_048_576  # bytes in one request body
WORKERS = 1  # uvicorn worker processes
RETRY_AFTER_S = 1  # what a shed request is told to wait
SHUTDOWN_TIMEOUT_S = 30.0  # how long SIGTERM waits for requests in flight
AUTH_TOKEN_ENV = "LANGOPS_SERVER_TOKEN"  # when this variable is set, every endpoint but /health needs it
PREDICTION_LOG_SAMPLE_RATE = 1.0  # share of requests written to the prediction log
PREDICTION_LOG_HASH_TEXTS = True  # store sha256 of texts instead of the texts
PREDICTION_LOG_MAX_BYTES = 10_485_760  # size of one prediction log file before it rotates
PREDICTION_LOG_BACKUPS = 5  # rotated files kept
PREDICTION_LOG_QUEUE = 10_000  # records waiting for the writer before new ones are dropped (and counted)
