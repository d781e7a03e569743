"""Training data: loading (``dataset``; reading what a source names safely, ``files``; image decoding,
``decoding``), the check of every row before training (``cleaning``), the latent and embedding cache
(``cache``), streaming (``streaming``) and the generated shapes data set (``shapes``)."""
