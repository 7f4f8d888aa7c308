from concept_erase.cli import console

console()
