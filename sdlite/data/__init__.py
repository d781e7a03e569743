"""Training data: loading (``dataset``), the latent and embedding cache (``cache``), and the generated
shapes data set (``shapes``)."""
