"""Training bench for "Diagnosing and Preventing Instabilities in Recurrent Video Processing"."""
