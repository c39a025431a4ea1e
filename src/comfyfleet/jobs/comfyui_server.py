"""The job as ComfyUI-server's clients know it: its record, the body of its answer to
`POST ROUTE_PREFIX` and of its callback (`COMFYUI_SERVER_COMPAT`).

ComfyUI-server answered and called back with one row of its `comfyui_records` table:
`id` (its integer primary key), `client_task_id`, `client_callback_url`, `comfyui_task_id`
(ComfyUI's prompt id), `comfyui_filepath` (the first image's path on the ComfyUI, deleted once
stored), `s3_key` (that image's object key) and `error_code` (0 success, 1 the prompt could not be
queued, 2 the S3 upload failed, 3 the image could not be fetched from ComfyUI, 10 anything
else). Those fields are given the same meanings here, on top of the job as GET /jobs/{id} shows
it, so a receiver reading the old fields keeps working and can move to the rest as it likes.
`id` is the job's id, a UUID string where ComfyUI-server had an integer.
"""

from __future__ import annotations

from typing import Any

COMFYUI_SERVER_FORMAT = "comfyui-server"

SUCCESS = 0
QUEUE_PROMPT_ERROR = 1
RETRIEVE_IMAGE_ERROR = 3
UNKNOWN_ERROR = 10
# comfyfleet's error types with a ComfyUI-server code of their own. Storage outages are waited
# out here, so its S3_UPLOAD_ERROR (2) never happens.
# An output that could not be stored after its tries (`collection_failed`) is, to a
# ComfyUI-server client, an image it could not retrieve.
_ERROR_CODES = {"prompt_rejected": QUEUE_PROMPT_ERROR, "output_unavailable": RETRIEVE_IMAGE_ERROR,
                "collection_failed": RETRIEVE_IMAGE_ERROR}


def _first_image(outputs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The output ComfyUI-server would have stored: the first image (else the first file)."""
    files = [output for output in outputs if isinstance(output.get("key"), str)]
    images = [output for output in files
              if str(output.get("content_type", "")).startswith("image/")]
    return next(iter(images or files), None)


def error_code(job: dict[str, Any]) -> int:
    if job["error"] is None:
        return SUCCESS
    return _ERROR_CODES.get(job["error"].get("type"), UNKNOWN_ERROR)


def comfyui_server_record(job: dict[str, Any]) -> dict[str, Any]:
    """The rendered job (jobs.render.job_json) with ComfyUI-server's record fields added."""
    image = _first_image(job["outputs"])
    return {
        **job,
        "client_callback_url": job["callback_url"],
        "comfyui_task_id": job["prompt_id"],
        "comfyui_filepath": image["filename"] if image is not None else None,
        "s3_key": image["key"] if image is not None else None,
        "error_code": error_code(job),
    }
