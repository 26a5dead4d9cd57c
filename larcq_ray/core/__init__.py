"""What every stage stands on: errors users see, audio decoding, inputs (corpus, queries, id lists),
storage (local paths and object-store URIs), the Ray session, devices, the stage contract
(stage.py) and the file-job skeleton the index and caption jobs share (file_job.py).
Reads and writes no artifact of its own."""
